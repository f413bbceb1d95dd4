"""`eval.preflight.check_tasks`: broken eval sets are found without a model, before anything runs."""

from __future__ import annotations

import io
import tarfile

import pytest

from eval.__main__ import main
from eval.preflight import check_tasks
from eval.tasks import parse_task_spec
from tests.test_eval import CLASSNAMES, make_classification, make_retrieval


@pytest.fixture
def root(tmp_path):
    make_classification(tmp_path / "wds_cifar10")
    make_retrieval(tmp_path / "wds_flickr30k")
    (tmp_path / "mnist").mkdir()  # a torchvision builder folder: checked for presence and templates only
    return tmp_path


def test_good_tasks_pass(root):
    assert check_tasks(parse_task_spec("cifar10,flickr30k,mnist"), root) == []
    assert check_tasks(parse_task_spec(f"mine={root / 'wds_cifar10'},pairs={root / 'wds_flickr30k'}"), None) == []


def test_missing_folder_and_wrong_classnames_name_task_and_path(root):
    make_classification(root / "wds_cars", classnames=CLASSNAMES[:4])  # labels reach 5, 4 class names
    tasks = parse_task_spec("cifar10,cub,cars")
    with pytest.raises(ValueError) as info:
        check_tasks(tasks, root)
    msg = str(info.value)
    assert "2 problem(s)" in msg and f"cub: no data found; looked for {root / 'wds_cub'}" in msg
    assert f"cars: {root / 'wds_cars' / 'classnames.txt'} has 4 lines but the test labels span 0..5" in msg
    assert str(root / "wds_cars" / "test" / "0.tar") in msg  # which shard the labels were read from
    problems = check_tasks(tasks, root, keep_going=True)  # partial evaluation: the list, no exception
    assert [p.split(":")[0] for p in problems] == ["cub", "cars"]


def test_each_kind_of_broken_folder_is_named(root):
    cls = root / "wds_cifar10"
    # a classification folder given to a retrieval task, and the other way round
    problems = check_tasks(parse_task_spec(f"flickr30k={cls},cifar10={root / 'wds_flickr30k'}"), None, keep_going=True)
    assert problems[0] == f"flickr30k: {cls / 'dataset_type.txt'} must say 'retrieval' for a retrieval task"
    assert problems[1].startswith(f"cifar10: {root / 'wds_flickr30k'} is a retrieval folder")
    # templates missing for a task without packaged prompts
    (cls / "zeroshot_classification_templates.txt").unlink()
    (problem,) = check_tasks(parse_task_spec(f"mine={cls}"), None, keep_going=True)
    assert problem.startswith(f"mine: no prompt templates for {cls}")
    # a .cls member that is not an integer, and a shard listed by nshards.txt that is absent
    bad = root / "bad"
    make_classification(bad)
    with tarfile.open(bad / "test" / "0.tar", "a") as tar:
        info = tarfile.TarInfo("zzzz.cls")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"red"))
    (problem,) = check_tasks(parse_task_spec(f"bad={bad}"), None, keep_going=True)
    assert problem.startswith(f"bad: {bad / 'test' / '0.tar'}: a .cls member holds b'red'")
    (bad / "test" / "nshards.txt").write_text("2\n")
    (problem,) = check_tasks(parse_task_spec(f"bad={bad}"), None, keep_going=True)
    assert str(bad / "test" / "1.tar") in problem and "nshards.txt" in problem
    # a registry task needs a dataset root
    (problem,) = check_tasks(parse_task_spec("cifar10"), None, keep_going=True)
    assert problem.startswith("cifar10: task 'cifar10' is looked for under a dataset root")


def test_zeroshot_cli_checks_before_loading_the_model(root, tmp_path, capsys):
    args = ["zeroshot", "--checkpoint", str(tmp_path / "no_such.pt"), "--model", "EmbeddedCLIP-Tiny",
            "--tasks", "cifar10,cub", "--dataset-root", str(root), "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cub: no data found" in err and "--checkpoint" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()

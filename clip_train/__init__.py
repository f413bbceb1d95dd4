"""clip_train: CLIP training on caption-mixed data, composed from open_clip, caption_mixing and ``training``.

Modules, one job each: ``config`` (the flat config and its presets), ``model`` (open_clip models),
``step`` (optimizer, loss, accumulation, one update), ``data`` (epoch planning and the input
loader), ``train`` (the training loop), ``evaluation`` (eval tasks, their preflight check, the
quick eval, all through ``eval.runner``), ``experiment`` (the hooks ``training.point.run_point``
calls for one sweep point) and ``__main__`` (``python -m clip_train``).
"""

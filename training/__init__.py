"""The training runtime both applications (``clip_train``, ``t2i``) share and neither owns.

One job per module: ``distributed`` (where this process sits; torchrun, srun and accelerate launch
all export the same variables), ``checkpoint`` (atomic save, newest-readable load), ``preemption``
(stop signals -> checkpoint at a step boundary), ``state`` (position and counters that a resume
restores), ``guard`` (the per-step collective: NaN loss or stop signal), ``steplog`` (progress bar,
``train_log.jsonl``, TensorBoard), ``device`` (device and CPU-thread choice), ``rundir`` (the run
folder: config hash, reuse or refusal, metadata) and ``point`` (one sweep point: check the folder,
resolve data, train, evaluate, write ``metrics.json``).
"""

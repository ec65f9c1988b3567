"""pipelines.training.restarts: reading the restarts back from a worker log."""

from pipelines.training import restarts

LOG = """\
(RayTrainWorker pid=1) step 1/20 loss=1.2 lr=0.01 world_size=2
(RayTrainWorker pid=1) step 2/20 loss=1.1 lr=0.01 world_size=2
(RayTrainWorker pid=1) step 7/20 loss=0.9 lr=0.01 world_size=2
(RayTrainWorker pid=9) resumed from s3://b/runs/smoke/checkpoint_2026 at step 4 (epoch 1, step 0 of it)
(RayTrainWorker pid=9) step 5/20 loss=0.95 lr=0.01 world_size=1
(RayTrainWorker pid=9) step 9/20 loss=0.8 lr=0.01 world_size=1
(RayTrainWorker pid=4) resumed from /runs/smoke/checkpoint_2027 at step 8 (epoch 2, step 0 of it)
(RayTrainWorker pid=4) step 9/20 loss=0.8 lr=0.01 world_size=2
"""


def test_steps_redone_per_restart_and_the_last_step():
    assert restarts.steps_redone(LOG) == [3, 1]  # 7 - 4, then 9 - 8
    assert restarts.last_step(LOG) == 9


def test_a_log_without_restarts():
    assert restarts.steps_redone("step 1/2 loss=1.0\nstep 2/2 loss=0.9\n") == []
    assert restarts.last_step("nothing yet") == 0

"""The filter the quiet-logs test counts library lines with: it must catch what the demo printed before."""
from logfilter import library_lines

# lines of a demo log from before the libraries were quieted (2026-12-06), and equiray's own
LIBRARY_LINES = """\
(RayTrainWorker pid=19761) Checkpoint successfully created at: Checkpoint(filesystem=local, path=/runs/x)
(TrainController pid=19646) Requesting resources: {'CPU': 1.0} * 1
(SplitCoordinator pid=1) ✔️  Dataset train_0359_0 execution finished in 8.90 seconds
/x/.venv/lib/python3.11/site-packages/mlflow/pyfunc/__init__.py:3344: UserWarning: An input example was not provided.
  color_warning(
Registered model 'equiray-backbone' already exists. Creating a new version of this model...
│ Search algorithm                 BasicVariantGenerator  │
(ServeReplica:equiray:EquirayModel pid=23606) INFO 2026-12-06 03:50:01,123 equiray_EquirayModel abc replica.py:1 -- ok
2026-12-06 03:36:18,266 INFO worker.py:1 -- Started a local Ray instance.
View detailed results here: /work/main/runs/canon-sweep-20261206-034142
(raylet) Task ServeController.graceful_shutdown failed. There are infinite retries remaining.
"""
EQUIRAY_LINES = """\
=== [2/10] pretrain: resnet8 on upright data with Ray Train, 3 epochs
(RayTrainWorker pid=19761) [pretrain] epoch 1/3  loss 0.4782  train acc 0.8278  val acc 0.8638  (21 s, 2535 samples/s)
(_trial pid=22885) [ftp] finetune epoch 1/6  loss 1.356  ID val 0.782  OOD mean 0.524  (1.8 s)
| pretrained backbone            | accuracy |
registered models:/m-f8d21f4f2f454a989bdefd98e42caa09 version 2 as equiray-backbone@pretrained
Ray: 2 CPUs, 0 GPUs on 1 node(s)
"""


def test_the_filter_tells_library_lines_from_equirays():
    found, total = library_lines(LIBRARY_LINES)
    assert total == 11 and len(found) == 11, set(LIBRARY_LINES.splitlines()) - set(found)
    found, total = library_lines(EQUIRAY_LINES + "\n\n")
    assert total == 6 and found == []


def test_a_transient_autoscaler_warning_prints_one_line_without_its_traceback():
    """Ray Train's 'Failed to send resource request' (a GetTimeoutError on a busy machine) keeps its line and loses
    its 20-line traceback in the pipelines' workers."""
    import io
    import logging

    from equiray_pipelines._ray import _without_traceback

    logger = logging.getLogger("equiray.test.autoscaler")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    logger.propagate = False

    def warn():
        try:
            raise TimeoutError("Get timed out: some object(s) not ready.")
        except TimeoutError:
            logger.warning("Failed to send resource request for train-1.", exc_info=True)

    try:
        warn()
        assert "Traceback" in stream.getvalue()  # without the filter: the traceback
        stream.seek(0)
        stream.truncate()
        logger.addFilter(_without_traceback)
        warn()
        assert stream.getvalue().splitlines() == ["Failed to send resource request for train-1."]
    finally:
        logger.removeHandler(handler)
        logger.filters.clear()


def test_a_worker_told_to_exit_prints_no_ignored_exception_and_other_ones_still_print():
    import sys
    import types

    from equiray_pipelines._ray import _quiet_exit_hook

    seen = []
    hook = _quiet_exit_hook(seen.append)
    exit_ = types.SimpleNamespace(exc_value=SystemExit(1))
    other = types.SimpleNamespace(exc_value=ValueError("a real one"))
    hook(exit_)
    hook(other)
    assert seen == [other]
    assert sys.unraisablehook is not hook  # the test installed nothing


def test_mlflows_signature_inference_warning_is_dropped_and_nothing_else():
    import logging

    from equiray_pipelines.tracking import _not_signature_inference

    def record(msg):
        return logging.LogRecord("mlflow.pyfunc", logging.WARNING, __file__, 1, msg, None, None)

    assert not _not_signature_inference(record("Failed to infer model signature: Type hint <input: ...>"))
    assert _not_signature_inference(record("Failed to log model: disk full"))


def test_rays_token_auth_notice_is_quiet_and_its_auth_off_warning_still_prints():
    """Ray's own functions, so that a change of Ray's wording fails here: the notice that a local Ray turned token
    authentication on goes; the warning that it is off (anyone on the network could run code) stays."""
    import io
    import logging

    from ray._private.authentication import authentication_token_setup as auth

    from equiray_pipelines._ray import quiet_logging

    logger = logging.getLogger(auth.__name__)
    installed = list(logger.filters)  # a pipeline test that started Ray earlier in the session added the filter
    logger.filters.clear()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    try:
        auth._warn_token_auth_enabled()
        assert "Token authentication is enabled" in stream.getvalue()  # before: printed
        stream.seek(0)
        stream.truncate()
        quiet_logging()
        auth._warn_token_auth_enabled()
        auth._warn_token_auth_disabled()
        lines = stream.getvalue().splitlines()
        assert len(lines) == 1 and "arbitrary code" in lines[0], lines
    finally:
        logger.removeHandler(handler)
        logger.filters[:] = installed

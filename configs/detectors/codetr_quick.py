# Co-DETR for the quick profile (smoke tests): the CPU default with a one-minute training cap.
# Not for results: configs/detectors/codetr.py holds the measured configuration.
_base_ = ["./codetr.py"]

train = dict(
    epochs=5,  # (int) budget: a handful of passes; the smoke test checks the plumbing, not accuracy
    max_minutes=None,  # (float|None) no wall-clock cap: the epochs alone end the run, on any machine
    val_interval=1,
)

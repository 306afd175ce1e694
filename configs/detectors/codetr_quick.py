# Co-DETR for the quick profile (smoke tests): the CPU default with a one-minute training cap.
# Not for results: configs/detectors/codetr.py holds the measured configuration.
_base_ = ['./codetr.py']

train = dict(
    epochs=5,          # a handful of passes: the smoke test checks the plumbing, not accuracy
    max_minutes=1,     # keeps `run --profile quick --detector codetr` within its 3-minute target
    val_interval=1,
)

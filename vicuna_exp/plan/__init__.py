"""Know before you launch: per-GPU memory, FLOPs, time and cost of a composed config.

Pure arithmetic on the config; nothing here imports torch. `main` is the `vicuna-exp plan` task,
`check_fits` the guard `train` runs first, `table` the one-line-per-job view of a sweep, and
`flops_per_token`/`mfu` what the training loop logs every step.
"""

from vicuna_exp.plan.estimate import Plan, make_plan, predicted_state_bytes
from vicuna_exp.plan.flops import achieved_tflops, flops_per_token, mfu, peak_tflops
from vicuna_exp.plan.report import check_fits, main, render, table

__all__ = [
    "Plan",
    "achieved_tflops",
    "check_fits",
    "flops_per_token",
    "main",
    "make_plan",
    "mfu",
    "peak_tflops",
    "predicted_state_bytes",
    "render",
    "table",
]

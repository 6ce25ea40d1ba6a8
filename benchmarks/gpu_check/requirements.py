"""What each step of benchmarks/gpu_check.sh needs, and whether this machine has it.

``python benchmarks/gpu_check/requirements.py [--dry-run] STEP...`` prints one ``STEP=REASON`` line per step:
an empty REASON when the step can run, else ``needs X, Y`` (missing packages, by their pip names) or ``needs a
CUDA GPU``. A package counts as missing when importing it (or, for the fits, the project modules that the fit
imports) raises ModuleNotFoundError; a package that is there but fails otherwise does not: its step runs and
its log shows the error.
"""

from __future__ import annotations

import importlib
import sys

# Module names imported by each step (the project's own modules last: they name what the others pull in).
FIT = [
    "torch",
    "torchvision",
    "numpy",
    "lightning",
    "torchmetrics",
    "jsonargparse",
    "docstring_parser",  # jsonargparse[signatures], which LightningCLI requires
    "typeshed_client",
    "albumentations",
    "torchdata",
    "faster_coco_eval",
    "matplotlib",
    "rich",
    "sta_lightning.cli",
]  # not wandb: without it the demo fits leave out the config's W&B logger (demo_fit.py)
STEPS = {
    "numerics": ["torch", "sta_lightning.models"],
    "benchmark": ["torch", "sta_lightning.models"],
    "export": ["torch", "torchvision", "numpy", "onnx", "onnxscript", "onnxruntime", "sta_lightning.export"],
    "fit-16-mixed": FIT,
    "fit-bf16-mixed": FIT,
    "resume": FIT,
}
PIP_NAMES = {
    "faster_coco_eval": "faster-coco-eval",
    "docstring_parser": "docstring-parser",
    "typeshed_client": "typeshed-client",
    "PIL": "pillow",
    "yaml": "pyyaml",
    "cv2": "opencv-python-headless",
    "pydantic_core": "pydantic-core",
    "google": "protobuf",
    "git": "gitpython",
    "sentry_sdk": "sentry-sdk",
}


def missing_packages(modules: list[str], cache: dict[str, str | None]) -> list[str]:
    """The pip names of the packages whose absence stops ``modules`` from importing."""
    missing = []
    for module in modules:
        if module not in cache:
            try:
                importlib.import_module(module)
                cache[module] = None
            except ModuleNotFoundError as error:
                top = (error.name or module).split(".")[0]
                cache[module] = None if top == "sta_lightning" else PIP_NAMES.get(top, top)
            except Exception:  # there, but broken: the step runs and shows it
                cache[module] = None
        if cache[module] and cache[module] not in missing:
            missing.append(cache[module])
    return missing


def main(argv: list[str]) -> None:
    dry_run = "--dry-run" in argv
    steps = [step for step in argv if step != "--dry-run"]
    cache: dict[str, str | None] = {}
    cuda = False
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        pass
    for step in steps:
        if step not in STEPS:
            print(f"{step}=unknown step (known: {', '.join(STEPS)})")
            continue
        missing = missing_packages(STEPS[step], cache)
        if missing:
            print(f"{step}=needs {', '.join(missing)}")
        elif not cuda and not dry_run:
            print(f"{step}=needs a CUDA GPU")
        else:
            print(f"{step}=")


if __name__ == "__main__":
    main(sys.argv[1:])

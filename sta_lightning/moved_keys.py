"""The config keys of sta_lightning 0.1 (flat) and where 0.2 moved them (groups), so that an old config or
command line fails with a message that says what changed."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

MOVED_MODEL_KEYS = {
    "model_scale": "detector.scale",
    "sta": "detector.sta",
    "freeze": "detector.freeze",
    "pretrained": "detector.pretrained",
    "num_classes": "classes (linked from the data)",
    "class_names": "classes (linked from the data)",
    "category_ids": "classes (linked from the data)",
    "optimizer": "optimizer.name",
    "lr0": "optimizer.lr0",
    "lrf": "optimizer.lrf",
    "lr_schedule": "optimizer.schedule",
    "momentum": "optimizer.momentum",
    "weight_decay": "optimizer.weight_decay",
    "nominal_batch_size": "optimizer.nominal_batch_size",
    "sta_lr_scale": "optimizer.sta_lr_scale",
    "warmup_epochs": "warmup.epochs",
    "warmup_min_iterations": "warmup.min_iterations",
    "warmup_bias_lr": "warmup.bias_lr",
    "warmup_momentum": "warmup.momentum",
    "ema": "ema.enabled",
    "ema_decay": "ema.decay",
    "ema_tau": "ema.tau",
    "box_gain": "loss.box_gain",
    "cls_gain": "loss.cls_gain",
    "dfl_gain": "loss.dfl_gain",
    "assigner_topk": "assigner.topk",
    "assigner_alpha": "assigner.alpha",
    "assigner_beta": "assigner.beta",
    "min_box_side": "assigner.min_box_side",
    "gradient_clip_norm": "step.gradient_clip_norm",
    "max_nonfinite_steps": "step.max_nonfinite_steps",
    "conf_threshold": "nms.conf_threshold",
    "iou_threshold": "nms.iou_threshold",
    "max_det": "nms.max_det",
    "multi_label": "nms.multi_label",
    "predict_conf_threshold": "predict_nms.conf_threshold",
    "predict_multi_label": "predict_nms.multi_label",
    "compile": "compile.enabled",
    "compile_backend": "compile.backend",
}
MOVED_DATA_KEYS = {
    **{
        f"{split}_{part}": f"{split}.{part}"
        for split in ("train", "val", "test", "predict")
        for part in ("images", "annotations")
    },
    **{key: f"loader.{key}" for key in ("batch_size", "num_workers", "pin_memory", "persistent_workers")},
    **{
        key: f"augment.{key}"
        for key in (
            "mosaic",
            "close_mosaic",
            "degrees",
            "translate",
            "scale",
            "hsv_h",
            "hsv_s",
            "hsv_v",
            "fliplr",
        )
    },
}
# Old keys that are group names now: only a plain value (not a mapping) under them is the old key.
_NOW_GROUPS = {"optimizer", "ema", "compile"}


def moved_in_section(section: str, values: Mapping[str, Any]) -> list[str]:
    """'model.old -> model.new' for each old key in a config's ``model`` or ``data`` section."""
    if section == "data" and isinstance(values.get("init_args"), Mapping):
        values = values["init_args"]
    table = MOVED_MODEL_KEYS if section == "model" else MOVED_DATA_KEYS
    return [
        f"{section}.{key} -> {section}.{table[key]}"
        for key, value in values.items()
        if key in table and not (key in _NOW_GROUPS and isinstance(value, Mapping))
    ]


def moved_in_arguments(arguments: Iterable[str]) -> list[str]:
    """The moved keys in a command line: its ``--config`` files and its ``--model.*`` / ``--data.*`` flags."""
    arguments = list(arguments)
    found = []
    for position, argument in enumerate(arguments):
        name, _, inline = argument.partition("=")
        if name in ("--config", "-c"):
            path = inline or (arguments[position + 1] if position + 1 < len(arguments) else "")
            found += [f"{path}: {line}" for line in _moved_in_file(path)]
        for section in ("model", "data"):
            prefix = f"--{section}."
            if name.startswith(prefix):
                key = name.removeprefix(prefix).removeprefix("init_args.").split(".")[0]
                table = MOVED_MODEL_KEYS if section == "model" else MOVED_DATA_KEYS
                if key in table and key not in _NOW_GROUPS:
                    found.append(f"{name} -> --{section}.{table[key]}")
    return found


def _moved_in_file(path: str) -> list[str]:
    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return []  # the parser reports unreadable files itself
    if not isinstance(config, Mapping):
        return []
    return [
        line
        for section in ("model", "data")
        if isinstance(config.get(section), Mapping)
        for line in moved_in_section(section, config[section])
    ]


def moved_keys_message(moved: list[str]) -> str:
    """The error for configs of the flat 0.1 layout."""
    return (
        "these options were renamed when sta_lightning 0.2 grouped the model and data options "
        "(docs/configuration.md lists the groups):\n  " + "\n  ".join(moved)
    )

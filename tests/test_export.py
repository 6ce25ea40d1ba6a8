"""Export of a demo checkpoint with the default STA blocks (ONNX, TorchScript, ExportedProgram) and the
onnxruntime detector: same decoded output, same NMS, same COCO metrics as PyTorch; the sidecar; bad input."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import onnxruntime
import pytest
import torch
from detector_checkpoint import write_scoring_checkpoint

from sta_lightning.__main__ import main
from sta_lightning.checkpoint_file import CheckpointError
from sta_lightning.data import DemoDataModule, LoaderConfig
from sta_lightning.deploy import OnnxDetector
from sta_lightning.export import PaddedNMS, export_detector
from sta_lightning.metrics import STAT_NAMES, evaluate_coco
from sta_lightning.models import (
    DEFAULT_STA,
    DetectorConfig,
    OutdatedCheckpointError,
    YOLOv8,
    detector_from_checkpoint,
    non_max_suppression,
)
from sta_lightning.training import DetectionModule
from sta_lightning.training.evaluation import detections_to_original

# 96 px: the P3 map (12x12) and the P4 map (6x6) are padded to whole 8x8 and 4x4 super-token cells.
IMAGE_SIZE = 96
VAL_NMS = {"conf_threshold": 0.001, "iou_threshold": 0.7, "max_det": 300, "multi_label": True}
# NMS stored in the exported graphs: multi-label, other IoU threshold and max_det than the validation's.
GRAPH_NMS = {"conf_threshold": 0.001, "iou_threshold": 0.6, "max_det": 40, "multi_label": True}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A Lightning checkpoint of YOLOv8n with the default STA blocks and the demo classes, written after a
    validation on the demo data. Its BatchNorm layers scale by 0.3 the statistics of the validation images:
    at the initial statistics the signal fades through the layers and every anchor gets the head's prior
    score (ties everywhere), at scale 1 the random network is chaotic (float noise grows to pixels), and a
    short fit would change neither (tests/test_cli.py checks that fit saves the averaged weights as the
    checkpoint's state_dict)."""
    root = tmp_path_factory.mktemp("export")
    datamodule = DemoDataModule(
        root=str(root / "demo"),
        num_train=1,
        num_val=6,
        image_size=IMAGE_SIZE,
        loader=LoaderConfig(batch_size=4, num_workers=0),
    )
    torch.manual_seed(0)
    module = DetectionModule(detector=DetectorConfig("n", sta="default"), classes=datamodule.classes)
    datamodule.prepare_data()
    datamodule.setup("validate")
    calibration = torch.cat([batch["images"] for batch in datamodule.val_dataloader()]).float() / 255
    for norm in module.model.modules():
        if isinstance(norm, torch.nn.BatchNorm2d):
            norm.reset_running_stats()
            norm.momentum = None  # a plain average of the batches seen
            norm.weight.data.fill_(0.3)
    with torch.no_grad():
        module.model.train()(calibration)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.validate(module, datamodule)
    checkpoint = root / "demo.ckpt"
    trainer.save_checkpoint(checkpoint)
    annotations = datamodule.annotation_file("validate")
    images = json.loads(Path(annotations).read_text())["images"]
    return {
        "root": root,
        "checkpoint": checkpoint,
        "datamodule": datamodule,
        "annotations": annotations,
        "paths": {image["id"]: root / "demo" / "val" / image["file_name"] for image in images},
        "logged": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
    }


@pytest.fixture(scope="module")
def exported(demo):
    """The files under test, each written by ``python -m sta_lightning export``; the decoded ONNX model
    without --image_size (the size the checkpoint records), the others with it."""
    nms = [f"--{key}={value}" for key, value in GRAPH_NMS.items() if key != "multi_label"] + ["--multi_label"]
    size = f"--image_size={IMAGE_SIZE}"
    files = {
        "onnx": ("decoded.onnx", "--dynamic_batch"),
        "onnx_nms": ("nms.onnx", size, "--batch=2", "--nms", *nms),
        "torchscript": ("nms.torchscript", size, "--format=torchscript", "--dynamic_batch", "--nms", *nms),
        "exported_program": ("half.pt2", size, "--format=exported_program", "--dynamic_batch", "--half"),
    }
    paths = {}
    for key, (name, *options) in files.items():
        paths[key] = demo["root"] / name
        main(["export", f"--ckpt_path={demo['checkpoint']}", f"--output={paths[key]}", *options])
    return paths


@pytest.fixture(scope="module")
def reference(demo):
    """PyTorch on the validation batches: the checkpoint's detector, its decoded output, the validation NMS
    and the detections in original pixels, as DetectionModule's validation computes them."""
    detector, _ = detector_from_checkpoint(demo["checkpoint"])
    datamodule = demo["datamodule"]
    datamodule.setup("validate")
    images, decoded, detections = [], [], {}
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            inputs = batch["images"].float() / 255
            output, _ = detector(inputs)
            found = detections_to_original(non_max_suppression(output, **VAL_NMS), batch)
            detections.update({int(i): rows for i, rows in zip(batch["image_ids"], found, strict=True)})
            images.append(inputs)
            decoded.append(output)
    return {
        "detector": detector,
        "images": torch.cat(images),
        "decoded": torch.cat(decoded),
        "detections": detections,
    }


def coco_rows(detections: dict[int, np.ndarray], category_ids: list[int]) -> np.ndarray:
    """{image_id: (n, 6) xyxy score class} -> (N, 7) [image_id, x, y, w, h, score, category_id]."""
    rows = [
        [image_id, x1, y1, x2 - x1, y2 - y1, score, category_ids[int(label)]]
        for image_id, found in detections.items()
        for x1, y1, x2, y2, score, label in np.asarray(found).tolist()
    ]
    return np.asarray(rows, dtype=np.float64).reshape(-1, 7)


def test_the_checkpoint_records_the_detector_its_classes_and_image_size(demo):
    _, trained = detector_from_checkpoint(demo["checkpoint"])
    assert trained.image_size == IMAGE_SIZE and trained.scale == "n"
    assert trained.classes == demo["datamodule"].classes
    assert trained.hyper_parameters["detector"]["pretrained"] is None


def test_the_checkpoint_detector_has_the_state_dict_weights(demo, reference):
    checkpoint = torch.load(demo["checkpoint"], weights_only=True)
    weights = reference["detector"].state_dict()
    assert list(reference["detector"].sta) == ["layer6", "layer8"]
    assert reference["detector"].sta_placements == DEFAULT_STA
    assert len(weights) == len(checkpoint["state_dict"])
    for key, value in checkpoint["state_dict"].items():
        assert torch.equal(weights[key.removeprefix("model.")], value), key


def test_onnxruntime_reproduces_the_decoded_output_on_real_images(exported, reference):
    session = onnxruntime.InferenceSession(str(exported["onnx"]), providers=["CPUExecutionProvider"])
    images, expected = reference["images"], reference["decoded"]
    assert [i.name for i in session.get_inputs()] == ["images"]
    for batch in (images[:1], images):  # the batch is free
        (decoded,) = session.run(None, {"images": batch.numpy()})
        assert decoded.shape == (len(batch), 4 + 5, (12 * 12 + 6 * 6 + 3 * 3))
        # Class probabilities within 1e-3 absolute; boxes (input pixels, up to 500 for this untrained model,
        # whose boxes PyTorch itself moves by 2e-3 px from one batch size to another) also 1e-5 relative.
        np.testing.assert_allclose(decoded[:, 4:], expected[: len(batch), 4:].numpy(), rtol=0, atol=1e-3)
        np.testing.assert_allclose(decoded[:, :4], expected[: len(batch), :4].numpy(), rtol=1e-5, atol=1e-3)


def test_onnxruntime_detections_and_coco_map_equal_pytorch(demo, exported, reference):
    detector = OnnxDetector(exported["onnx"], batch_size=4, **VAL_NMS)
    image_ids = sorted(demo["paths"])
    found = dict(zip(image_ids, detector.predict([demo["paths"][i] for i in image_ids]), strict=True))
    assert sum(len(rows) for rows in found.values()) > 20
    for image_id, rows in found.items():
        expected = reference["detections"][image_id].numpy()
        assert rows.shape == expected.shape, image_id
        # Original pixels: the input's tolerance times 1 / scale (about 5 for these images)
        np.testing.assert_allclose(rows[:, :4], expected[:, :4], rtol=5e-5, atol=5e-3)
        np.testing.assert_allclose(rows[:, 4], expected[:, 4], rtol=0, atol=1e-5)
        np.testing.assert_array_equal(rows[:, 5], expected[:, 5])
    category_ids = detector.category_ids
    ours = evaluate_coco(demo["annotations"], coco_rows(found, category_ids))
    pytorch = evaluate_coco(demo["annotations"], coco_rows(reference["detections"], category_ids))
    for name in STAT_NAMES:
        assert ours[name] == pytest.approx(pytorch[name], abs=1e-4), name
    assert pytorch["map"] == pytest.approx(demo["logged"]["val/mAP"], abs=1e-9)  # the validation's own


def test_onnx_nms_equals_pytorch_nms(demo, exported, reference):
    session = onnxruntime.InferenceSession(str(exported["onnx_nms"]), providers=["CPUExecutionProvider"])
    images = reference["images"][:2]
    (detections,) = session.run(None, {"images": images.numpy()})
    assert detections.shape == (2, GRAPH_NMS["max_det"], 6)
    expected = non_max_suppression(reference["decoded"][:2], **GRAPH_NMS, max_candidates=1000)
    for rows, wanted in zip(detections, expected, strict=True):
        real = rows[rows[:, 4] > 0]
        assert len(real) == len(wanted) > 0 and not rows[len(real) :].any()
        np.testing.assert_allclose(real, wanted.numpy(), rtol=1e-5, atol=1e-3)
        np.testing.assert_array_equal(real[:, 5], wanted[:, 5].numpy())
    # The runtime gives the same detections through the built-in NMS (a fixed batch of 2 for 3 images: the
    # last run is filled with grey) as through its own NMS on the decoded model.
    paths = [demo["paths"][i] for i in sorted(demo["paths"])[:3]]
    built_in = OnnxDetector(exported["onnx_nms"]).predict(paths)
    separate = OnnxDetector(exported["onnx"], **GRAPH_NMS).predict(paths)
    for ours, theirs in zip(built_in, separate, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=5e-5, atol=5e-3)
    with pytest.raises(ValueError, match="NMS built in"):
        OnnxDetector(exported["onnx_nms"], conf_threshold=0.5)


def test_torchscript_and_exported_program_reproduce_the_output(exported, reference):
    images = reference["images"][:3]
    with torch.no_grad():
        detections = torch.jit.load(str(exported["torchscript"]))(images)
        # --half: float16 weights and input, the output of the float16 detector (one image: slow on a CPU)
        decoded = torch.export.load(exported["exported_program"]).module()(images[:1].half())
        expected = copy.deepcopy(reference["detector"]).half()(images[:1].half())[0]
    torch.testing.assert_close(decoded, expected, rtol=0, atol=0)
    wanted = non_max_suppression(reference["decoded"][:3], **GRAPH_NMS, max_candidates=1000)
    assert detections.shape == (3, GRAPH_NMS["max_det"], 6)
    for rows, kept in zip(detections, wanted, strict=True):
        torch.testing.assert_close(rows[: len(kept)], kept, rtol=1e-5, atol=1e-3)
        assert not rows[len(kept) :].any()


def sidecar(model: Path) -> dict:
    return json.loads(model.with_name(model.name + ".json").read_text())


def test_the_sidecar_states_the_contract(demo, exported):
    decoded = sidecar(exported["onnx"])
    assert decoded["class_names"] == ["circle", "square", "triangle", "star", "cross"]
    assert decoded["category_ids"] == [1, 2, 3, 4, 5]
    assert decoded["image_size"] == IMAGE_SIZE and decoded["letterbox_colour"] == 114
    assert decoded["input"] | {"layout": None} == {
        "name": "images",
        "shape": ["batch", 3, IMAGE_SIZE, IMAGE_SIZE],
        "dtype": "float32",
        "layout": None,
    }
    assert decoded["output"]["name"] == "decoded" and decoded["output"]["shape"] == ["batch", 9, 189]
    assert decoded["nms"] is None and decoded["checkpoint"] == str(demo["checkpoint"])
    assert [p["layer"] for p in decoded["model"]["sta"]] == [6, 8] and decoded["model"]["scale"] == "n"
    assert decoded["versions"]["torch"] == torch.__version__ and decoded["versions"]["opset"] >= 18
    assert {"sta_lightning", "onnx", "onnxscript", "torchvision"} <= decoded["versions"].keys()
    with_nms = sidecar(exported["onnx_nms"])
    assert with_nms["nms"] == GRAPH_NMS | {"max_candidates": 1000}
    assert with_nms["output"]["name"] == "detections" and with_nms["output"]["shape"] == [2, 40, 6]
    traced = sidecar(exported["torchscript"])
    assert traced["format"] == "torchscript" and "onnx" not in traced["versions"]
    assert traced["output"]["shape"] == ["batch", 40, 6] and traced["output"]["dtype"] == "float32"
    program = sidecar(exported["exported_program"])
    assert program["input"]["dtype"] == "float16" and program["output"]["dtype"] == "float16"


def test_deploy_imports_neither_lightning_nor_albumentations(demo, exported):
    image = next(iter(demo["paths"].values()))
    script = (
        "import sys\n"
        "from sta_lightning.deploy import OnnxDetector\n"
        f"OnnxDetector({str(exported['onnx'])!r})({str(image)!r})\n"
        "print([m for m in ('lightning', 'pytorch_lightning', 'albumentations') if m in sys.modules])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--format=tflite"], "invalid choice: 'tflite'"),
        (["--image_size=100"], "multiple of 32, got 100"),
        (["--conf_threshold=0.5"], "--conf_threshold only apply with --nms"),
        (["--batch=2", "--dynamic_batch"], "not allowed with argument --batch"),
    ],
)
def test_bad_options_are_refused_naming_the_value(demo, capsys, arguments, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", f"--ckpt_path={demo['checkpoint']}", *arguments])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_missing_or_foreign_checkpoints_are_refused(tmp_path, capsys):
    missing = tmp_path / "missing.ckpt"
    with pytest.raises(SystemExit):
        main(["export", f"--ckpt_path={missing}"])
    assert f"checkpoint {missing} does not exist" in capsys.readouterr().err
    foreign = tmp_path / "weights.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CheckpointError, match=rf"checkpoint {foreign} is not a checkpoint written by .* fit"):
        detector_from_checkpoint(foreign)
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export_detector(YOLOv8("n", 2), tmp_path / "m.x", format="tflite")
    with pytest.raises(ValueError, match="iou_threshold must be in"):
        PaddedNMS(iou_threshold=0.0)


def test_export_without_image_size_needs_a_checkpoint_that_records_it(tmp_path, capsys):
    sizeless = write_scoring_checkpoint(tmp_path / "sizeless.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", f"--ckpt_path={sizeless}"])
    assert exit_info.value.code == 2
    assert f"{sizeless} does not record its training size: give --image_size" in capsys.readouterr().err
    sized = write_scoring_checkpoint(tmp_path / "sized.ckpt", image_size=64)
    main(["export", f"--ckpt_path={sized}", f"--output={tmp_path / 'sized.onnx'}"])
    metadata = sidecar(tmp_path / "sized.onnx")
    assert metadata["image_size"] == 64 and metadata["input"]["shape"] == [1, 3, 64, 64]
    assert metadata["class_names"] == ["0", "1", "2", "3", "4"] and metadata["category_ids"] == [
        0,
        1,
        2,
        3,
        4,
    ]


def test_export_refuses_a_checkpoint_of_the_flat_layout_naming_it(tmp_path, capsys):
    content = torch.load(write_scoring_checkpoint(tmp_path / "model.ckpt"), weights_only=True)
    content["hyper_parameters"] = {"model_scale": "n", "sta": None, "num_classes": 5, "ema_decay": 0.9999}
    old = tmp_path / "old.ckpt"
    torch.save(content, old)
    with pytest.raises(OutdatedCheckpointError, match=rf"checkpoint {old} was written by sta_lightning 0.1"):
        detector_from_checkpoint(old)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", f"--ckpt_path={old}", "--image_size=64"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"checkpoint {old} was written by sta_lightning 0.1" in error and "model.detector.scale" in error

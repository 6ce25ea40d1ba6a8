"""The YOLOv8 training recipe: parameter groups, optimizer, warmup / decay schedule, weight decay, EMA."""

import dataclasses
import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from tiny_fit import fit_steps
from torch import nn

from sta_lightning.classes import Classes
from sta_lightning.models import DEFAULT_STA, AssignerConfig, DetectorConfig, STAPlacement, YOLOv8
from sta_lightning.training import DetectionModule, ModelEMA
from sta_lightning.training.compile import CompileConfig
from sta_lightning.training.ema import EMAConfig
from sta_lightning.training.optim import (
    OptimizerConfig,
    TrainingSchedule,
    WarmupConfig,
    accumulation_steps,
    apply_step_settings,
    build_optimizer,
    parameter_groups,
    scaled_weight_decay,
    warmup_iterations,
)


def test_parameter_groups_of_yolov8n():
    groups = parameter_groups(YOLOv8("n", 80))
    # As in the reference: 64 decayed weights (including the frozen DFL bins), 57 norm weights, 63 biases.
    assert {name: len(params) for name, params in groups.items()} == {"bias": 63, "weight": 64, "norm": 57}
    assert sum(not p.requires_grad for p in groups["weight"]) == 1
    assert all(p.ndim == 1 for p in groups["norm"] + groups["bias"])


def test_parameter_groups_with_sta_put_layer_norms_and_layer_scales_where_they_belong():
    model = YOLOv8("n", 5, DEFAULT_STA)
    groups = {name: {id(p) for p in params} for name, params in parameter_groups(model).items()}
    names = {id(p): name for name, p in model.named_parameters()}
    assert sum(len(ids) for ids in groups.values()) == len(names)
    for name, parameter in model.named_parameters():
        if name.endswith("bias"):
            assert id(parameter) in groups["bias"], name
        elif ".norm1." in name or ".norm2." in name:  # LayerNorm2d (nn.LayerNorm inside) and BatchNorm2d
            assert id(parameter) in groups["norm"], name
    assert any(".norm1.norm.weight" in names[i] for i in groups["norm"])


def test_parameter_groups_equal_the_reference_trainer():
    pytest.importorskip("ultralytics")
    from ultralytics.engine.trainer import BaseTrainer
    from ultralytics.nn.tasks import DetectionModel

    reference_model = DetectionModel("yolov8n.yaml", nc=5, verbose=False)
    reference = BaseTrainer.build_optimizer(
        SimpleNamespace(args=SimpleNamespace()),
        reference_model,
        name="SGD",
        lr=0.01,
        momentum=0.937,
        decay=5e-4,
    )
    config = OptimizerConfig(name="SGD", lr0=0.01, momentum=0.937, weight_decay=5e-4)
    ours = build_optimizer(YOLOv8("n", 5), config)

    def shapes(group):
        # The frozen DFL weights differ in shape ((1, 16, 1, 1) there, (16,) here) and get no gradient.
        return [tuple(p.shape) for p in group["params"] if p.requires_grad]

    # Reference group order: biases, decayed weights, norm weights; the same as ours.
    for ref_group, our_group in zip(reference.param_groups, ours.param_groups, strict=True):
        assert shapes(ref_group) == shapes(our_group)
        assert ref_group["weight_decay"] == our_group["weight_decay"]
        assert ref_group["momentum"] == our_group["momentum"] and our_group["nesterov"]


def test_build_optimizer_adamw_uses_momentum_as_beta1():
    config = OptimizerConfig(name="AdamW", lr0=0.002, momentum=0.9, weight_decay=1e-3)
    optimizer = build_optimizer(nn.Conv2d(3, 4, 3), config)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["name"] for g in optimizer.param_groups] == ["bias", "weight", "norm"]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 1e-3, 0.0]
    assert all(g["betas"] == (0.9, 0.999) for g in optimizer.param_groups)
    with pytest.raises(ValueError, match="'SGD' or 'AdamW'"):
        build_optimizer(nn.Conv2d(3, 4, 3), OptimizerConfig(name="Adam"))


@pytest.mark.parametrize(
    ("batch", "expected_accumulate", "expected_decay"),
    [(16, 4, 5e-4), (24, 3, 5e-4 * 24 * 3 / 64), (64, 1, 5e-4), (128, 1, 1e-3), (48, 1, 5e-4 * 48 / 64)],
)
def test_accumulation_and_weight_decay_scale_to_the_nominal_batch(batch, expected_accumulate, expected_decay):
    assert accumulation_steps(64, batch) == expected_accumulate
    assert scaled_weight_decay(5e-4, 64, batch) == pytest.approx(expected_decay)


def test_warmup_iterations_has_the_classic_floor():
    assert warmup_iterations(WarmupConfig(epochs=3.0, min_iterations=100), 1000) == 3000
    assert warmup_iterations(WarmupConfig(epochs=3.0, min_iterations=100), 20) == 100
    assert warmup_iterations(WarmupConfig(epochs=3.0, min_iterations=0), 20) == 60
    assert warmup_iterations(WarmupConfig(epochs=0.0, min_iterations=100), 20) == -1


def _schedule(schedule: str = "linear", warmup_iters: int | None = None) -> TrainingSchedule:
    optimizer = OptimizerConfig(lr0=0.01, lrf=0.01, schedule=schedule, momentum=0.937, nominal_batch_size=64)
    warmup = WarmupConfig(epochs=3.0, min_iterations=100, bias_lr=0.1, momentum=0.8)
    return TrainingSchedule(
        optimizer=optimizer,
        warmup=warmup,
        epochs=10,
        warmup_iters=warmup_iterations(warmup, 30) if warmup_iters is None else warmup_iters,
        total_batch_size=16,
    )


def test_schedule_values_equal_the_reference_formulas():
    schedule = _schedule()  # 30 batches per epoch: warmup = max(90, 100) = 100 iterations
    assert schedule.warmup_iters == 100
    start = schedule.at(0, 0)
    assert start.lrs == (0.1, 0.0, 0.0) and start.momentum == pytest.approx(0.8) and start.accumulate == 1
    # Iteration 50 lies in epoch 1: lf(1) = (1 - 1/10) * 0.99 + 0.01 = 0.901, target lr 0.00901.
    middle = schedule.at(50, 1)
    assert middle.lrs == pytest.approx((0.1 + (0.00901 - 0.1) / 2, 0.00901 / 2, 0.00901 / 2))
    assert middle.momentum == pytest.approx(0.8 + 0.137 / 2)
    assert middle.accumulate == 2  # round(1 + 3 / 2) with round-half-even, as numpy rounds
    end = schedule.at(100, 3)
    assert end.lrs == pytest.approx((0.00703,) * 3) and end.momentum == pytest.approx(0.937)
    assert end.accumulate == 4
    after = schedule.at(101, 3)
    assert after.lrs == pytest.approx((0.00703,) * 3) and after.momentum is None and after.accumulate == 4
    assert schedule.at(299, 9).lrs == pytest.approx((0.01 * (0.1 * 0.99 + 0.01),) * 3)


def test_cosine_decay_and_no_warmup():
    schedule = _schedule(schedule="cosine", warmup_iters=-1)
    assert schedule.lr_factor(0) == pytest.approx(1.0)
    assert schedule.lr_factor(5) == pytest.approx(0.505)
    assert schedule.lr_factor(10) == pytest.approx(0.01)
    first = schedule.at(0, 0)
    assert first.lrs == pytest.approx((0.01,) * 3) and first.momentum is None and first.accumulate == 4


def test_apply_step_settings_sets_momentum_only_during_warmup():
    optimizer = build_optimizer(nn.Conv2d(3, 4, 3), OptimizerConfig(name="SGD", lr0=0.01, momentum=0.937))
    schedule = _schedule()
    apply_step_settings(optimizer, schedule.at(10, 0))
    assert [g["lr"] for g in optimizer.param_groups] == list(schedule.at(10, 0).lrs)
    assert all(g["momentum"] == pytest.approx(0.8 + 0.137 * 0.1) for g in optimizer.param_groups)
    apply_step_settings(optimizer, schedule.at(500, 5))
    assert all(g["momentum"] == pytest.approx(0.8 + 0.137 * 0.1) for g in optimizer.param_groups)


class _TinyModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 4)
        self.norm = nn.BatchNorm1d(4)


def test_ema_follows_the_yolov8_rule_on_parameters_and_batchnorm_buffers():
    torch.manual_seed(0)
    module = _TinyModule()
    ema = ModelEMA(decay=0.9999, tau=2000.0)
    ema.setup(None, module, "fit")
    averaged = ema.averaged_model.module
    expected = {k: v.clone() for k, v in module.state_dict().items()}
    for update in (1, 2, 3):
        with torch.no_grad():
            for tensor in module.state_dict().values():
                if tensor.is_floating_point():
                    tensor.add_(torch.randn_like(tensor))
        module.norm.num_batches_tracked += 5
        ema.averaged_model.update_parameters(module)
        d = 0.9999 * (1 - math.exp(-update / 2000))
        for key, value in module.state_dict().items():
            if value.is_floating_point():
                expected[key] = d * expected[key] + (1 - d) * value
        assert ema.updates == update
        for key, value in averaged.state_dict().items():
            torch.testing.assert_close(value, expected[key], msg=key)
    assert averaged.norm.num_batches_tracked == 0  # integer buffers are not averaged


def test_classes_validate_their_names_and_ids():
    with pytest.raises(ValueError, match="3 category ids for 2 names"):
        Classes(["a", "b"], [1, 2, 3])
    with pytest.raises(ValueError, match="category ids repeat"):
        Classes(["a", "b"], [7, 7])
    with pytest.raises(ValueError, match="at least one class name"):
        Classes([])
    assert Classes(["a", "b"]).category_ids == [0, 1]
    assert Classes.anonymous(3) == Classes(["0", "1", "2"], [0, 1, 2])


def test_module_without_classes_has_80_anonymous_ones():
    module = DetectionModule()
    assert module.classes == Classes.anonymous(80) and module.model.num_classes == 80
    assert module.hparams["classes"] == {
        "names": [str(i) for i in range(80)],
        "category_ids": list(range(80)),
    }


def test_module_validates_its_sta_placements():
    with pytest.raises(ValueError, match="detector.sta must be 'default'"):
        DetectionModule(detector=DetectorConfig(sta="everywhere"), classes=Classes.anonymous(3))
    sta = [{"layer": 8, "stoken_size": [1, 1]}]
    module = DetectionModule(detector=DetectorConfig(sta=sta), classes=Classes.anonymous(3))
    assert list(module.model.sta.keys()) == ["layer8"]
    assert module.hparams["detector"]["sta"][0]["stoken_size"] == (1, 1)


def test_hyperparameters_are_the_model_and_recipe_groups_without_run_settings():
    module = DetectionModule(
        classes=Classes(["cat", "dog"], [17, 18]), optimizer=OptimizerConfig(name="AdamW", lr0=0.002)
    )
    assert set(module.hparams) == {
        "detector",
        "classes",
        "optimizer",
        "warmup",
        "ema",
        "loss",
        "assigner",
        "step",
    }
    assert module.hparams["classes"] == {"names": ["cat", "dog"], "category_ids": [17, 18]}
    assert module.hparams["optimizer"]["name"] == "AdamW" and module.hparams["optimizer"]["lr0"] == 0.002
    assert module.hparams["ema"] == {"enabled": True, "decay": 0.9999, "tau": 2000.0}


def test_detector_config_to_checkpoint_resolves_the_placements_and_drops_pretrained():
    config = DetectorConfig(scale="s", sta="default", freeze=10, pretrained="yolov8s.pt")
    stored = config.to_checkpoint()
    assert stored["pretrained"] is None
    assert stored["sta"] == [dataclasses.asdict(p) for p in DEFAULT_STA]
    assert (stored["scale"], stored["freeze"]) == ("s", 10)
    assert DetectorConfig(**stored).placements() == tuple(DEFAULT_STA)
    assert DetectorConfig(sta=None).to_checkpoint()["sta"] is None
    explicit = DetectorConfig(sta=[STAPlacement(layer=8), {"layer": 6, "num_heads": 2}]).to_checkpoint()
    assert explicit["sta"] == [
        dataclasses.asdict(STAPlacement(layer=8)),
        dataclasses.asdict(STAPlacement(6, num_heads=2)),
    ]


def test_default_sta_is_stored_resolved_in_the_hyperparameters():
    # A checkpoint must rebuild the model it was trained with even if the DEFAULT_STA preset changes later.
    classes = Classes.anonymous(3)
    module = DetectionModule(detector=DetectorConfig(sta="default"), classes=classes)
    rebuilt = DetectionModule(detector=DetectorConfig(**module.hparams["detector"]), classes=classes)
    assert [p["layer"] for p in module.hparams["detector"]["sta"]] == [p.layer for p in DEFAULT_STA]
    assert rebuilt.model.state_dict().keys() == module.model.state_dict().keys()


def test_assigner_settings_reach_the_loss():
    module = DetectionModule(
        classes=Classes.anonymous(3), assigner=AssignerConfig(topk=13, alpha=1.0, beta=4.0, min_box_side=16)
    )
    assigner = module.loss.assigner
    assert (assigner.topk, assigner.alpha, assigner.beta, assigner.min_box_side) == (13, 1.0, 4.0, 16)
    # classic YOLOv8 by default
    assert DetectionModule(classes=Classes.anonymous(3)).loss.assigner.min_box_side is None


def _two_step_fit(root, compile: CompileConfig = CompileConfig()) -> tuple[dict, DetectionModule]:
    """Two optimizer steps of yolov8n with the default STA on 8 demo images at 64 px (no validation):
    (the initial state dict, the trained module)."""
    torch.manual_seed(0)
    module = DetectionModule(
        detector=DetectorConfig(sta="default"),
        classes=Classes.anonymous(5),
        optimizer=OptimizerConfig(nominal_batch_size=4),
        warmup=WarmupConfig(epochs=0),
        ema=EMAConfig(enabled=False),
        compile=compile,
    )
    initial = {key: value.clone() for key, value in module.state_dict().items()}
    fit_steps(module, root, steps=2, image_size=64)
    return initial, module


def test_compiled_train_step_trains_like_the_eager_one(tmp_path):
    """compile.enabled (backend aot_eager: it traces forward and backward like Inductor, without generating
    code, so the test stays short on CPU): the same weights after two steps, the state dict keys unchanged."""
    initial, eager = _two_step_fit(tmp_path / "demo")
    _, compiled = _two_step_fit(tmp_path / "demo", CompileConfig(enabled=True, backend="aot_eager"))
    assert compiled._compiled_model is not None and eager._compiled_model is None
    eager_state, compiled_state = eager.state_dict(), compiled.state_dict()
    assert compiled_state.keys() == eager_state.keys() == initial.keys()
    for key, value in compiled_state.items():
        torch.testing.assert_close(value, eager_state[key], rtol=1e-4, atol=1e-5, msg=key)
    assert not torch.equal(
        compiled_state["model.sta.layer6.0.mlp2.fc1.weight"], initial["model.sta.layer6.0.mlp2.fc1.weight"]
    )


def test_unknown_compile_backend_is_refused_by_name():
    with pytest.raises(ValueError, match="compile.backend 'inductr'"):
        CompileConfig(enabled=True, backend="inductr")


def test_load_from_checkpoint_rebuilds_the_config_groups_and_weights(tmp_path):
    # Lightning passes the checkpoint's hyperparameters (plain dicts) back to __init__.
    module = DetectionModule(
        detector=DetectorConfig(scale="n", sta=[{"layer": 8, "stoken_size": [1, 1], "num_heads": 2}]),
        classes=Classes(["cat", "dog"], [17, 18]),
        optimizer=OptimizerConfig(name="AdamW", lr0=0.002),
        ema=EMAConfig(tau=5.0),
    )
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "module.ckpt")
    loaded = DetectionModule.load_from_checkpoint(tmp_path / "module.ckpt")
    assert loaded.optimizer_config == OptimizerConfig(name="AdamW", lr0=0.002)
    assert loaded.ema_config.tau == 5.0 and loaded.classes == Classes(["cat", "dog"], [17, 18])
    assert [p.layer for p in loaded.model.sta_placements] == [8]
    for key, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

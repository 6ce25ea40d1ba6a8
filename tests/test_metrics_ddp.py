"""COCOEvaluator under real torch.distributed (2 spawned processes, gloo): same metrics as one process."""

import json
import pickle
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from distributed_helpers import free_port
from test_metrics import SYNTHETIC_CATEGORY_IDS, per_image_tensors, update_in_batches, write_synthetic_coco
from torch.utils.data import DistributedSampler

from sta_lightning.metrics import COCOEvaluator, evaluate_coco

WORLD_SIZE = 2
NUM_IMAGES = 25  # odd: the DistributedSampler pads rank 1 with a repeat of the first image
# What each rank feeds in one epoch: "padded" its DistributedSampler share; "rank1_no_detections" the same,
# but rank 1's detections are empty; "rank1_no_images" rank 1 calls no update at all; "no_images" nobody does.
SCENARIOS = ("padded", "rank1_no_detections", "rank1_no_images", "no_images")


def sampler_shares(image_ids: list[int]) -> list[list[int]]:
    """The image ids each rank sees with Lightning's default DistributedSampler (shuffle off, padding on)."""
    return [
        [
            image_ids[i]
            for i in DistributedSampler(image_ids, num_replicas=WORLD_SIZE, rank=rank, shuffle=False)
        ]
        for rank in range(WORLD_SIZE)
    ]


def _worker(rank, port, annotation_file, shares, tensors, out_dir):
    """One rank: one evaluator, one epoch per scenario; pickles {scenario: metrics dict or error text}."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=60),
    )
    evaluator = COCOEvaluator(annotation_file, SYNTHETIC_CATEGORY_IDS, per_class=True)
    outcomes = {}
    for scenario in SCENARIOS:
        evaluator.reset()
        if scenario == "padded" or (scenario.startswith("rank1") and rank == 0):
            update_in_batches(evaluator, shares[rank], tensors)
        elif scenario == "rank1_no_detections":
            update_in_batches(evaluator, shares[rank], {})
        try:
            outcomes[scenario] = evaluator.compute()
        except (ValueError, RuntimeError) as error:
            outcomes[scenario] = f"{type(error).__name__}: {error}"
    dist.destroy_process_group()
    (out_dir / f"rank{rank}.pkl").write_bytes(pickle.dumps(outcomes))


def single_process(annotation_file, image_ids: list[int], tensors: dict) -> dict:
    evaluator = COCOEvaluator(annotation_file, SYNTHETIC_CATEGORY_IDS, per_class=True)
    update_in_batches(evaluator, image_ids, tensors)
    return evaluator.compute()


def test_two_processes_equal_one(tmp_path):
    annotation_file = tmp_path / "instances.json"
    detections = write_synthetic_coco(annotation_file, seed=7, num_images=NUM_IMAGES)
    tensors = per_image_tensors(detections, list(SYNTHETIC_CATEGORY_IDS))
    image_ids = [image["id"] for image in json.loads(annotation_file.read_text())["images"]]
    shares = sampler_shares(image_ids)
    assert shares[1][-1] == image_ids[0] and len(shares[0]) == len(shares[1])  # padding duplicated image 0

    mp.spawn(_worker, args=(free_port(), annotation_file, shares, tensors, tmp_path), nprocs=WORLD_SIZE)
    ranks = [pickle.loads((tmp_path / f"rank{rank}.pkl").read_bytes()) for rank in range(WORLD_SIZE)]

    rank1_ids = set(shares[1]) - set(shares[0])
    expected = {
        "padded": single_process(annotation_file, image_ids, tensors),
        "rank1_no_detections": single_process(
            annotation_file, image_ids, {i: t for i, t in tensors.items() if i not in rank1_ids}
        ),
        "rank1_no_images": single_process(annotation_file, shares[0], tensors),
    }
    for scenario, metrics in expected.items():
        assert ranks[0][scenario] == ranks[1][scenario] == metrics, scenario
    assert ranks[0]["rank1_no_detections"]["map"] < ranks[0]["padded"]["map"]
    assert ranks[0]["no_images"].startswith("ValueError: COCOEvaluator.compute: no image was added")
    assert ranks[1]["no_images"].startswith("RuntimeError: COCO evaluation failed on rank 0: ValueError")

    # Without de-duplication the padded image's detections would count twice (the copies are false positives).
    padded_twice = detections + [d for d in detections if d["image_id"] == image_ids[0]]
    counted_twice = evaluate_coco(annotation_file, padded_twice)
    assert counted_twice["map"] < expected["padded"]["map"]

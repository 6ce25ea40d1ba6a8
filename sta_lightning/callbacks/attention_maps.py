"""Log each STA block's super-token association on a fixed set of validation images."""

from collections.abc import Sequence

from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_warn

from sta_lightning.callbacks.drawing import association_panel, spread_tokens, token_weight_map
from sta_lightning.callbacks.image_logging import log_images
from sta_lightning.callbacks.validation_samples import ValidationSamplesCallback
from sta_lightning.training.module import DetectionModule

CORNER_QUARTERS = ((0.25, 0.25), (0.25, 0.75), (0.75, 0.25), (0.75, 0.75))


class AttentionMapsCallback(ValidationSamplesCallback):
    """Super-token association maps of every super-token STA block, as one image strip per block and image.

    Each strip is the letterboxed input image drawn 1 + len(tokens) times: first the hard assignment (each
    pixel's most associated super token) as superpixel-like boundaries, then for a few super tokens spread
    over the grid their soft weight at every pixel as a heatmap (scaled to the token's peak weight, stated in
    the caption) with the token's own cell outlined. Logged under ``<key>/<block name>``, e.g.
    ``val/attention/sta.layer4.0``.

    Args:
        num_images: the first ``num_images`` images of the validation set.
        every_n_epochs: log after the validation of every n-th training epoch.
        token_positions: the super tokens shown as heatmaps, as fractional (row, column) grid positions.
        cmap: matplotlib colormap of the heatmaps.
        key: logging key prefix.
    """

    def __init__(
        self,
        num_images: int = 4,
        every_n_epochs: int = 1,
        token_positions: Sequence[tuple[float, float]] = CORNER_QUARTERS,
        cmap: str = "jet",
        key: str = "val/attention",
    ) -> None:
        super().__init__(num_images, every_n_epochs)
        self.token_positions = [tuple(position) for position in token_positions]
        self.cmap = cmap
        self.key = key

    def log_samples(self, trainer: Trainer, pl_module: DetectionModule, samples: dict) -> None:
        detector = pl_module.model
        with detector.capture_associations() as associations:
            detector(pl_module.model_input(samples["images"]))
        if not associations:
            rank_zero_warn(
                "AttentionMapsCallback: the detector has no super-token STA block; nothing to show."
            )
            return
        images = samples["images"].permute(0, 2, 3, 1).cpu().numpy()
        image_ids = samples["image_ids"].tolist()
        for block, (weights, grid, stoken_size) in associations.items():
            weights = weights.float().cpu().numpy()
            tokens = spread_tokens(grid, self.token_positions)
            stride = images.shape[1] // weights.shape[2]
            description = (
                f"{block} (stride {stride}, {stoken_size[0]}x{stoken_size[1]} cells, {grid[0]}x{grid[1]} "
                f"super tokens): hard assignment, then soft weights of tokens (peak)"
            )
            panels, captions = [], []
            for image, image_id, image_weights in zip(images, image_ids, weights, strict=True):
                panels.append(association_panel(image, image_weights, grid, stoken_size, tokens, self.cmap))
                peaks = [token_weight_map(image_weights, grid, stoken_size, token).max() for token in tokens]
                listed = ", ".join(f"{token} ({peak:.2f})" for token, peak in zip(tokens, peaks, strict=True))
                captions.append(f"image {image_id}, {description} {listed}")
            log_images(trainer, f"{self.key}/{block}", panels, captions)

"""Monkeypatch: BN re-estimation (and optionally calibration) batches drawn without augmentation."""
import os, torch
from ultralytics.data.build import build_yolo_dataset, build_dataloader
from ultralytics.utils.torch_utils import unwrap_model
from ultralytics_gabfusion import trainer as T

MODE = os.environ.get("GAB_PLAIN", "")  # "bn" or "both"
_orig = T.GABTrainerMixin._train_images

@torch.no_grad()
def _train_images(self, n, raw=False):
    if not MODE or (MODE == "bn" and not raw):
        return _orig(self, n, raw)
    batch = max(self.batch_size // max(self.world_size, 1), 1)
    gs = max(int(unwrap_model(self.model).stride.max()), 32)
    ds = build_yolo_dataset(self.args, self.data["train"], batch, self.data, mode="val", rect=False, stride=gs,
                            fraction=self.args.fraction)
    loader = build_dataloader(ds, batch, self.args.workers, shuffle=True, rank=-1, device=self.device)
    images = []
    for i, b in enumerate(loader):
        if i >= n:
            break
        images.append(b["img"].clone() if raw else self.preprocess_batch(b)["img"].float())
    return images

T.GABTrainerMixin._train_images = _train_images

"""MemLab's replication measure: is a generation a near-copy of a training image?

The VAE's own round trip bounds how close any generation can come to a training image x:
even a perfectly memorized latent decodes to D(E(x)), not x. So distance is measured in units of
that image's round-trip error:

    ratio(g, x) = RMSE(g, x) / RMSE(D(E(x)), x)

and ``g`` replicates ``x`` when ratio <= ``threshold`` (default 2.0). The nearest training image
is the one with the smallest ratio. On MemLab two independent renders of the same caption differ
in their undescribed background, so their ratio is far above 2 (``chance_rate`` measures it).

Rendering the ~5,700 training images and their VAE round trips takes about 20 s on two cores, and
every audit, mitigation report and benchmark needs them, so they are kept in diffmem's disk cache
(``diffmem.core.cache``) under a hash of the dataset config, the rendering code and the VAE weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_THRESHOLD = 2.0


def roundtrip_rmse(vae, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Per-image RMSE of D(E(x)) against x, for float images (N, H, W, 3) in [0, 1]."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).permute(0, 3, 1, 2).float().to(vae.device)
            # in the VAE's dtype (a pipeline loaded in bfloat16), measured against x in float32
            z = vae.encode((x * 2 - 1).to(vae.dtype)).latent_dist.mean
            rec = ((vae.decode(z).sample.float() + 1) / 2).clamp(0, 1)
            out.append((rec - x).pow(2).mean(dim=(1, 2, 3)).sqrt().cpu().numpy())
    return np.concatenate(out)


def training_set(dataset, vae) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, images, VAE round-trip RMSE) of the dataset's distinct images, from the disk cache
    when an entry for this dataset config, rendering code, torch and VAE exists."""
    from pathlib import Path

    from ..core import cache
    from . import dataset as dataset_module
    from . import world

    weights = [part for name, t in sorted(vae.state_dict().items())
               for part in (name, str(t.dtype), t.detach().cpu().float().contiguous().numpy())]
    key = cache.content_key(json.dumps(dataset.config.to_dict(), sort_keys=True), torch.__version__, vae.device.type,
                            *(Path(m.__file__).read_bytes() for m in (world, dataset_module)), *weights)
    hit = cache.load_arrays("memlab_training_set", key)
    if hit is not None and {"ids", "images", "vae_rmse"} <= hit.keys():
        return hit["ids"], hit["images"], hit["vae_rmse"]
    ids, images = dataset.unique_images()
    rmse = roundtrip_rmse(vae, images)
    cache.save_arrays("memlab_training_set", key, {"ids": ids, "images": images, "vae_rmse": rmse})
    return ids, images, rmse


@dataclass
class ReplicationMatch:
    nearest_id: np.ndarray  # image id of the nearest training image (by ratio)
    ratio: np.ndarray  # ratio to that image
    rmse: np.ndarray  # RMSE to that image
    replicated: np.ndarray  # ratio <= threshold


class MemLabReplication:
    """Nearest-training-image ratios for generations, against a MemLab training set."""

    def __init__(self, dataset, vae, threshold: float = DEFAULT_THRESHOLD):
        self.threshold = threshold
        ids, images, self.vae_rmse = training_set(dataset, vae)
        self.ids = ids
        self.index = {int(i): k for k, i in enumerate(ids)}
        self.train = torch.from_numpy(images.reshape(len(images), -1))
        self._vae_rmse_t = torch.from_numpy(self.vae_rmse)

    def _rmse(self, gens: np.ndarray) -> torch.Tensor:
        g = torch.from_numpy(np.ascontiguousarray(gens, dtype=np.float32).reshape(len(gens), -1))
        return torch.cdist(g, self.train) / np.sqrt(self.train.shape[1])

    def nearest(self, gens: np.ndarray) -> ReplicationMatch:
        rmse = self._rmse(gens)
        ratio = rmse / self._vae_rmse_t[None]
        r, k = ratio.min(dim=1)
        return ReplicationMatch(self.ids[k.numpy()], r.numpy(), rmse[torch.arange(len(k)), k].numpy(),
                                (r <= self.threshold).numpy())

    def ratio_to(self, gens: np.ndarray, image_ids) -> np.ndarray:
        """Ratio of each generation to a given training image (its own planted image, say)."""
        cols = torch.tensor([self.index[int(i)] for i in np.broadcast_to(image_ids, (len(gens),))])
        g = torch.from_numpy(np.ascontiguousarray(gens, dtype=np.float32).reshape(len(gens), -1))
        rmse = (g - self.train[cols]).pow(2).mean(dim=1).sqrt()
        return (rmse / self._vae_rmse_t[cols]).numpy()

"""Common loader plumbing: a datamodule that holds one dataset per split."""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader, Dataset

__all__ = ["SplitDataModule"]


class SplitDataModule(L.LightningDataModule):
    """Subclasses fill ``self.datasets`` (``train``/``val``/``test``) in ``setup`` and save
    ``batch_size``, ``eval_batch_size``, ``num_workers`` and ``pin_memory`` as hparams."""

    def __init__(self) -> None:
        super().__init__()
        self.datasets: dict[str, Dataset] = {}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        hp = self.hparams
        bs = hp.batch_size if split == "train" else (hp.eval_batch_size or hp.batch_size)
        ds = self.datasets[split]
        return DataLoader(
            ds, batch_size=bs, shuffle=shuffle, num_workers=hp.num_workers,
            pin_memory=hp.pin_memory, persistent_workers=hp.num_workers > 0,
            drop_last=shuffle and len(ds) > bs,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

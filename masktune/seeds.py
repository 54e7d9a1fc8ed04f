"""Every random stream of a run comes from its one ``seed``, each at its own offset, so that a change to one
(the fill's pairing, say) leaves the others as they were."""

import torch

OFFSETS = {
    "erm": 0,  # the ERM's initialisation, data order and augmentation; the images a figure shows
    "finetune_order": 1,  # the fine-tunes' data order and augmentation: the same for every variant
    "fill_pairing": 2,  # which image fills which image's mask: the same for every variant
    "random_masks": 3,  # where the random-mask control moves each mask
    "mask_partners": 4,  # the images of another class that the decisive extent tests regions against
    "val_shortcut": 998,  # which validation images carry which planted marker
    "train_shortcut": 999,  # which training images carry which planted marker
    "test_sets": 1000,  # the markers of the aligned and conflicting test images
    "val_sets": 1001,  # the same for the validation images
}


def stream(seed: int, purpose: str) -> torch.Generator:
    """A CPU generator for one of ``OFFSETS``' purposes."""
    return torch.Generator().manual_seed(seed + OFFSETS[purpose])

"""CelebA attributes: the Kaggle archive or torchvision's files, the official train/valid/test partitions.

Labels are the ``target_attributes`` as 0/1 floats (N, A) (multi-label, binary cross-entropy); each image's
spurious attribute is ``spurious_attribute`` (0/1).
"""

import os

import torch

from masktune.console import UserError, check
from masktune.images import FileList


def celeba_files(data_dir: str) -> tuple[str, str, str] | None:
    """(attribute file, partition file, image folder) for the Kaggle archive or torchvision's layout, or
    None when neither is in ``data_dir``."""
    for root in (data_dir, os.path.join(data_dir, "archive"), os.path.join(data_dir, "celeba")):
        for ext in ("csv", "txt"):
            attributes = os.path.join(root, f"list_attr_celeba.{ext}")
            partition = os.path.join(root, f"list_eval_partition.{ext}")
            if os.path.isfile(attributes) and os.path.isfile(partition):
                for images in (
                    os.path.join(root, "img_align_celeba", "img_align_celeba"),
                    os.path.join(root, "img_align_celeba"),
                ):
                    if os.path.isdir(images):
                        return attributes, partition, images
                raise UserError(
                    f"CelebA images not found: expected {root}/img_align_celeba/ (Kaggle: "
                    "img_align_celeba/img_align_celeba/) with the .jpg files"
                )
    return None


def _rows(path: str) -> list[list[str]]:
    try:
        with open(path) as f:
            return [line.replace(",", " ").split() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path!r} ({type(e).__name__})") from None


def read_celeba_tables(
    attributes_path: str, partition_path: str
) -> tuple[list[str], list[str], torch.Tensor, dict]:
    """(image ids, attribute names, 0/1 attribute tensor (N, 40), {image id: partition 0/1/2}).

    Reads the Kaggle CSVs (``image_id,<attr>...`` / ``image_id,partition``) and torchvision's TXT files
    (a count line, a line of attribute names, then ``<id> -1 1 ...`` / ``<id> <partition>``).
    """
    attr_rows = _rows(attributes_path)
    if attributes_path.endswith(".csv"):
        check(
            attr_rows and attr_rows[0][0] == "image_id",
            f"{attributes_path!r} should start with an image_id header",
        )
        names, body = attr_rows[0][1:], attr_rows[1:]
    else:
        check(len(attr_rows) >= 2, f"{attributes_path!r} is too short to be list_attr_celeba.txt")
        names, body = attr_rows[1], attr_rows[2:]
    check(len(names) > 0 and len(body) > 0, f"{attributes_path!r} lists no attributes or no images")
    try:
        values = torch.tensor([[int(v) for v in r[1:]] for r in body])
    except ValueError:
        raise UserError(f"{attributes_path!r} has a non-integer attribute value") from None
    check(
        values.shape[1] == len(names), f"{attributes_path!r}: rows do not have {len(names)} attribute values"
    )
    check(
        bool(((values == 1) | (values == -1) | (values == 0)).all()),
        f"{attributes_path!r}: values must be -1/1",
    )
    partition_rows = _rows(partition_path)
    if partition_rows and partition_rows[0][0] == "image_id":
        partition_rows = partition_rows[1:]
    try:
        partition = {r[0]: int(r[1]) for r in partition_rows}
    except (IndexError, ValueError):
        raise UserError(f"{partition_path!r} is malformed (expected '<image id> <0|1|2>' per line)") from None
    return [r[0] for r in body], names, (values == 1).float(), partition


def list_celeba(config: dict) -> tuple[FileList, FileList, FileList]:
    """CelebA's official train / valid / test partitions (see the module docstring)."""
    files = celeba_files(config["data_dir"])
    check(
        files is not None,
        f"CelebA not found in {config['data_dir']!r}: put the Kaggle archive there "
        "(list_attr_celeba.csv, list_eval_partition.csv, img_align_celeba/) or torchvision's files "
        "(list_attr_celeba.txt, list_eval_partition.txt, img_align_celeba/); see the README",
    )
    attributes_path, partition_path, image_dir = files
    ids, names, values, partition = read_celeba_tables(attributes_path, partition_path)
    targets, spurious_name = config["target_attributes"], config["spurious_attribute"]
    unknown = [a for a in [*targets, spurious_name] if a not in names]
    check(not unknown, f"unknown CelebA attribute(s) {unknown}; known: {', '.join(names)}")
    check(len(targets) > 0, "target_attributes must name at least one attribute")
    columns = [names.index(a) for a in targets]
    spurious = values[:, names.index(spurious_name)].long()
    splits = []
    for code in (0, 1, 2):
        index = torch.tensor(
            [i for i, image_id in enumerate(ids) if partition.get(image_id) == code], dtype=torch.long
        )
        check(
            len(index) > 0,
            f"CelebA partition {code} (0/1/2 = train/valid/test) is empty in {partition_path!r}",
        )
        splits.append(
            FileList(
                [os.path.join(image_dir, ids[i]) for i in index.tolist()],
                values[index][:, columns],
                list(targets),
                spurious[index],
                [f"not {spurious_name}", spurious_name],
            )
        )
    return splits[0], splits[1], splits[2]

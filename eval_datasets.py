"""The zero-shot benchmark datasets that evaluate.py reads (docs/datasets.md): every name of `--datasets`, where its
files go, its split and its class names. Only evaluation imports this file: training data is common.py's, and so is
what AdvFLYP's early stopping shares with evaluation (class folders, WordNet ids named, TinyImageNet, the last checks:
common.labelled). It left common.py, which the training scripts share, for the reason attacks.py did: one reader.

Sections, in the order data flows (search for the `# ---- name` rule):
    loaders     one per dataset: (root, transform, download) -> (dataset, class names or None, WordNet ids or None);
                the test split where torchvision has one, the whole set for Caltech101, Caltech256, SUN397, EuroSAT
    registry    EVAL_DATASETS (name -> loader, where its files go, their layout, downloadable), AGFT_DATASETS,
                eval_dataset (one --datasets entry, checked, with its prompt template)
"""
import json
import os
import re

import common
from common import FileList, UsageError, image_folder, read_data_list

# `--datasets all`: the 15 datasets of the AGFT paper, in the column order of its tables
AGFT_DATASETS = ("Caltech101", "Caltech256", "CIFAR10", "CIFAR100", "DTD", "EuroSAT", "FGVCAircraft", "Flowers102",
                 "Food101", "ImageNet", "OxfordIIITPet", "PCAM", "StanfordCars", "STL10", "SUN397")
NATIVE_RESOLUTION = ("CIFAR10", "CIFAR100", "STL10")  # attacked at their own size: the encoder resizes inside
SYNTHETIC_EVAL_SIZE = 1024  # images of the `synthetic` evaluation set (benchmarks); --samples takes fewer


# ------------------------------------------------------------------------------------------------------- loaders
def native_transform():
    from torchvision import transforms
    return transforms.Compose([transforms.Lambda(common.to_rgb), transforms.ToTensor()])


def _torchvision(cls_name, **split):
    """A torchvision dataset class with the given split; class names from its `classes`."""
    def load(root, transform, download):
        from torchvision import datasets
        ds = getattr(datasets, cls_name)(root, transform=transform, download=download, **split)
        return ds, list(ds.classes), None
    return load


def _caltech101(root, transform, download):
    if download:
        from torchvision import datasets
        datasets.Caltech101(root, download=True)
    # read as a folder: torchvision's reader imports scipy for every item; BACKGROUND_Google is not a class
    ds, classes = image_folder(os.path.join(root, "caltech101", "101_ObjectCategories"), transform,
                               exclude=("BACKGROUND_Google",))
    return ds, classes, None


def _caltech256(root, transform, download):
    if download:
        from torchvision import datasets
        datasets.Caltech256(root, download=True)
    # top-level .jpg only, as torchvision counts them; '001.ak47' -> 'ak47', 'airplanes-101' -> 'airplanes'
    ds, folders = image_folder(os.path.join(root, "caltech256", "256_ObjectCategories"), transform, recursive=False)
    return ds, [re.sub(r"-101$", "", re.sub(r"^\d+\.", "", c)) for c in folders], None


def _eurosat(root, transform, download):
    if download:
        from torchvision import datasets
        datasets.EuroSAT(root, download=True)
    ds, folders = image_folder(os.path.join(root, "eurosat", "2750"), transform)
    names = read_data_list("eurosat.tsv")  # folder (CamelCase) -> a name a caption would use
    if any(c not in names for c in folders):
        raise UsageError(f"EuroSAT: unexpected class folder(s) {[c for c in folders if c not in names]} "
                         f"(expected {', '.join(names)})")
    return ds, [names[c] for c in folders], None


def _country211(root, transform, download):
    if download:
        from torchvision import datasets
        datasets.Country211(root, split="test", download=True)
    ds, codes = image_folder(os.path.join(root, "country211", "test"), transform)
    names = read_data_list("iso3166.tsv")  # ISO 3166-1 alpha-2 code -> country name
    if any(c not in names for c in codes):
        raise UsageError(f"Country211: unknown country code(s) {[c for c in codes if c not in names]}")
    return ds, [names[c] for c in codes], None


def _sun397(root, transform, download):
    from torchvision import datasets
    if download:
        datasets.SUN397(root, download=True)
    base = os.path.join(root, "SUN397")
    with open(os.path.join(base, "ClassName.txt")) as f:
        classes = [line.strip() for line in f if line.strip()]  # '/a/abbey', '/b/balcony/exterior', ...
    samples = []  # sorted, unlike torchvision's rglob order
    for label, c in enumerate(classes):
        folder = os.path.join(base, c.lstrip("/"))
        samples += [(os.path.join(folder, f), label) for f in sorted(os.listdir(folder))
                    if f.startswith("sun_") and f.endswith(".jpg")]
    return FileList(samples, transform), [c[3:].replace("/", " ") for c in classes], None


def _flowers102(root, transform, download):
    from torchvision import datasets
    ds = datasets.Flowers102(root, split="test", transform=transform, download=download)
    return ds, read_data_list("flowers102.txt"), None  # torchvision has no names: the 102 categories, label order


def _pcam(root, transform, download):
    from torchvision import datasets
    ds = datasets.PCAM(root, split="test", transform=transform, download=download)
    return ds, read_data_list("pcam.txt"), None  # docs/evaluation.md: the two classes as sentences


def _stanford_cars(root, transform, download):
    from torchvision import datasets
    ds = datasets.StanfordCars(root, split="test", transform=transform)  # no download: torchvision's URL is gone
    return ds, [re.sub(r"\s+\d{4}$", "", c) for c in ds.classes], None  # year stripped (docs/evaluation.md)


def _imagenet(root, transform, download):
    base = os.path.join(root, "imagenet")
    meta = common.imagenet_meta(base)  # read, never written here
    if meta is not None and not os.path.isdir(os.path.join(base, "val")):
        from torchvision.datasets.imagenet import parse_val_archive
        parse_val_archive(base, wnids=meta[1])  # ILSVRC2012_img_val.tar -> val/<wnid>/ (rank 0 first: load_datasets)
    ds, wnids = image_folder(os.path.join(base, "val"), transform)  # val/<wnid>/, sorted like torchvision's
    return ds, None if meta is None else [meta[0][w][0] for w in wnids], wnids  # first synonym


def _wnid_folder(folder):
    """ImageNet-R, -A, -Sketch: folders of WordNet ids, named through ImageNet's devkit or --class-names."""
    def load(root, transform, download):
        ds, wnids = image_folder(os.path.join(root, folder), transform)
        return ds, None, wnids
    return load


def objectnet_crop(image, border=2):
    """ObjectNet's images carry a thin red frame: cut `border` pixels off every side (2, as the ObjectNet authors'
    own PyTorch loader, objectnet-template-pytorch, does) before the usual Resize + CenterCrop."""
    width, height = image.size
    return image.crop((border, border, width - border, height - border))


def _read_mapping(path):
    try:
        with open(path, encoding="utf-8") as f:
            table = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"ObjectNet: cannot read {path} ({type(e).__name__}: {e}); expected the mappings/ folder "
                         "that ships with objectnet-1.0")
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise UsageError(f"ObjectNet: {path} is not a JSON object of strings, as objectnet-1.0 ships it")
    return table


def _objectnet(root, transform, download):
    """ObjectNet's classes that overlap ImageNet (AdvFLYP, Table 5): the keys of the dataset's own
    mappings/objectnet_to_imagenet_1k.json (ObjectNet label -> ImageNet labels), each read from the image folder
    that mappings/folder_to_objectnet_label.json (folder -> ObjectNet label) gives it; classes in sorted folder
    order, named by their ObjectNet labels. Every image: red frame cropped, then `transform`."""
    from torchvision import transforms
    base = os.path.join(root, "objectnet-1.0")
    folder_to_label = _read_mapping(os.path.join(base, "mappings", "folder_to_objectnet_label.json"))
    overlap = _read_mapping(os.path.join(base, "mappings", "objectnet_to_imagenet_1k.json"))
    label_to_folder = {label: folder for folder, label in folder_to_label.items()}
    unknown = [label for label in overlap if label not in label_to_folder]
    if unknown:
        raise UsageError(f"ObjectNet: {len(unknown)} label(s) of objectnet_to_imagenet_1k.json have no folder in "
                         f"folder_to_objectnet_label.json, e.g. {unknown[0]!r}")
    folders = sorted(label_to_folder[label] for label in overlap)
    samples = []
    for label, folder in enumerate(folders):
        path = os.path.join(base, "images", folder)
        files = sorted(f for f in os.listdir(path) if f.lower().endswith(common.IMAGE_EXTENSIONS)) \
            if os.path.isdir(path) else []
        if not files:
            raise UsageError(f"ObjectNet: no images in {path} (class {folder_to_label[folder]!r})")
        samples += [(os.path.join(path, f), label) for f in files]
    ds = FileList(samples, transforms.Compose([transforms.Lambda(objectnet_crop), transform]))
    return ds, [folder_to_label[f] for f in folders], None


# ------------------------------------------------------------------------------------------------------ registry
# name: (loader, what must exist under --data-root, what goes there, whether --download can fetch it)
EVAL_DATASETS = {
    "Caltech101": (_caltech101, "caltech101/101_ObjectCategories", "one folder of images per category", True),
    "Caltech256": (_caltech256, "caltech256/256_ObjectCategories", "folders 001.ak47/ ... 257.clutter/ of .jpg", True),
    "CIFAR10": (_torchvision("CIFAR10", train=False), "cifar-10-batches-py", "CIFAR-10, python version", True),
    "CIFAR100": (_torchvision("CIFAR100", train=False), "cifar-100-python", "CIFAR-100, python version", True),
    "DTD": (_torchvision("DTD", split="test", partition=1), "dtd/dtd", "images/ and labels/ of dtd-r1.0.1", True),
    "EuroSAT": (_eurosat, "eurosat/2750", "EuroSAT RGB: one folder of .jpg per class", True),
    "FGVCAircraft": (_torchvision("FGVCAircraft", split="test", annotation_level="variant"), "fgvc-aircraft-2013b",
                     "data/ of fgvc-aircraft-2013b", True),
    "Flowers102": (_flowers102, "flowers-102",
                   "jpg/, imagelabels.mat, setid.mat; needs scipy", True),
    "Food101": (_torchvision("Food101", split="test"), "food-101", "images/ and meta/", True),
    "ImageNet": (_imagenet, "imagenet", "ILSVRC2012_devkit_t12.tar.gz (or meta.bin) and val/ or "
                 "ILSVRC2012_img_val.tar, from image-net.org", False),
    "OxfordIIITPet": (_torchvision("OxfordIIITPet", split="test"), "oxford-iiit-pet", "images/ and annotations/",
                      True),
    "PCAM": (_pcam, "pcam", "camelyonpatch_level_2_split_test_x.h5 and _y.h5; needs h5py", True),
    "StanfordCars": (_stanford_cars, "stanford_cars", "devkit/, cars_test/ and cars_test_annos_withlabels.mat; "
                     "needs scipy", False),
    "STL10": (_torchvision("STL10", split="test"), "stl10_binary", "STL-10 binary version", True),
    "SUN397": (_sun397, "SUN397", "ClassName.txt and the class folders a/abbey/ ...", True),
    "Country211": (_country211, "country211/test", "one folder of images per ISO country code", True),
    "ImageNet-R": (_wnid_folder("imagenet-r"), "imagenet-r", "200 folders named by WordNet id", False),
    "ImageNet-Sketch": (_wnid_folder("imagenet-sketch"), "imagenet-sketch",
                        "1000 folders named by WordNet id (the archive's sketch/, renamed)", False),
    "ImageNet-A": (_wnid_folder("imagenet-a"), "imagenet-a", "200 folders named by WordNet id", False),
    "TinyImageNet": (common.tiny_imagenet, "tiny-imagenet-200", "wnids.txt, words.txt and val/ of tiny-imagenet-200",
                     True),
    "ObjectNet": (_objectnet, "objectnet-1.0", "images/<folder>/*.png and mappings/folder_to_objectnet_label.json, "
                  "mappings/objectnet_to_imagenet_1k.json of objectnet-1.0", False),
}


def eval_dataset(spec, root, resolution, download=False, class_names_file=None):
    """(name, dataset of (image in [0, 1], label), class names refined for prompts, template) for one --datasets
    entry: a name of EVAL_DATASETS, `demo` (the demo's held-out concepts) or `folder:PATH` (ImageFolder layout).
    A dataset that is not there raises a one-line UsageError saying what to put where."""
    templates = read_data_list("templates.tsv")
    if spec == "demo":  # the same test images as common.demo_evaluate's held-out set
        ds = common.DemoImages(common.DEMO_HELD_OUT, 512 // len(common.DEMO_HELD_OUT), resolution, seed=2)
        return "demo", ds, ds.classes, templates["demo"]
    if spec == "synthetic":  # for benchmarks: random images at the model's resolution, 1000 classes like ImageNet
        ds = common.SyntheticImages(SYNTHETIC_EVAL_SIZE, 1000, resolution, seed=3)
        return "synthetic", ds, ds.classes, templates["folder"]
    transform = native_transform() if spec in NATIVE_RESOLUTION else common.image_transform(resolution)
    if spec.startswith("folder:"):
        path = spec[len("folder:"):].rstrip("/") or "/"
        if not os.path.isdir(path):
            raise UsageError(f"--datasets {spec}: no such directory")
        name, key = os.path.basename(os.path.abspath(path)), "folder"
        ds, names, wnids = common.image_folder_classes(path, transform)
    elif spec in EVAL_DATASETS:
        name = key = spec
        loader, where, layout, can_download = EVAL_DATASETS[spec]
        path = os.path.join(root, where)
        fetch = "pass --download to fetch it" if can_download else "download it yourself"
        if not download and not os.path.exists(path):
            raise UsageError(f"{name}: not found, expected {path} ({layout}); {fetch}")
        try:
            ds, names, wnids = loader(root, transform, download)
        except UsageError:
            raise
        except ImportError as e:
            raise UsageError(f"{name}: needs the Python package '{e.name}' (pip install {e.name})")
        except Exception as e:  # torchvision's 'Dataset not found or corrupted', a missing file, a failed download
            message = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            if download:  # --download was given: say what to do instead of asking for it again
                fetch = "check the network, or put the files there yourself" if can_download else fetch
            raise UsageError(f"{name}: could not {'download or ' if download else ''}read {path} ({message}); "
                             f"expected {layout}; {fetch}")
    else:
        raise UsageError(f"--datasets {spec}: unknown dataset (one of {', '.join(EVAL_DATASETS)}, demo, synthetic, "
                         "all, folder:PATH)")
    return common.labelled(name, ds, names, wnids, root, class_names_file, templates[key])

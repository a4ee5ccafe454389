"""Label sets as data: class names and colour palettes (PASCAL VOC, COCO-Stuff, generic)."""

from __future__ import annotations

import dataclasses

Color = tuple[int, int, int]

# Ground-truth value for "not labelled / ignore" in VOC and COCO-Stuff label maps.
IGNORE_INDEX = 255


def palette_for(n: int) -> list[Color]:
    """The PASCAL VOC colour map for `n` labels (distinct for n <= 256).

    Label i's bits are dealt round-robin to R, G, B, most significant bit first:
    bit 3k of i sets bit 7-k of R, bit 3k+1 of G, bit 3k+2 of B.
    """
    colors = []
    for label in range(n):
        r = g = b = 0
        c = label
        for k in range(8):
            r |= ((c >> 0) & 1) << (7 - k)
            g |= ((c >> 1) & 1) << (7 - k)
            b |= ((c >> 2) & 1) << (7 - k)
            c >>= 3
        colors.append((r, g, b))
    return colors


@dataclasses.dataclass(frozen=True)
class LabelSet:
    """Names of a dataset's label ids (index = id) and the colours they are drawn in."""

    name: str
    classes: tuple[str, ...]
    unused: frozenset[int] = frozenset()  # ids that exist but have no training pixels

    @property
    def palette(self) -> list[Color]:
        return palette_for(len(self.classes))

    def __len__(self) -> int:
        return len(self.classes)


VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)

# COCO-Stuff: id k is COCO category k + 1 (things 1..91, stuff 92..182); "unlabeled" is 255.
# Eleven of the 91 thing ids of the COCO paper were never annotated, so 171 ids are used.
COCOSTUFF_CLASSES: tuple[str, ...] = (
    # things
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "street sign", "stop sign", "parking meter", "bench",
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
    "hat", "backpack", "umbrella", "shoe", "eye glasses", "handbag", "tie", "suitcase",
    "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "plate", "wine glass", "cup",
    "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "mirror", "dining table", "window", "desk", "toilet", "door", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "blender", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush", "hair brush",
    # stuff
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage",
    "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds",
    "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence",
    "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog",
    "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill",
    "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud",
    "napkin", "net", "paper", "pavement", "pillow", "plant-other", "plastic", "platform",
    "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug", "salad",
    "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs",
    "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree",
    "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone",
    "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind", "window-other",
    "wood",
)

# Thing ids with no annotations (street sign, hat, shoe, eye glasses, plate, mirror, window,
# desk, door, blender, hair brush), 0-based like the label maps.
COCOSTUFF_UNUSED: frozenset[int] = frozenset({11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90})

VOC = LabelSet("PASCAL VOC 2012", VOC_CLASSES)
COCOSTUFF = LabelSet("COCO-Stuff", COCOSTUFF_CLASSES, COCOSTUFF_UNUSED)

# Known label sets by class count, used to name the classes of bare checkpoints.
LABEL_SETS: dict[str, LabelSet] = {"voc": VOC, "cocostuff": COCOSTUFF}


def generic(n: int) -> LabelSet:
    """A label set for an unknown dataset: names class_0 .. class_{n-1}."""
    return LabelSet("unknown", tuple(f"class_{i}" for i in range(n)))


def for_class_count(n: int) -> LabelSet:
    """The known label set with `n` classes, else generic names."""
    for labels in LABEL_SETS.values():
        if len(labels) == n:
            return labels
    return generic(n)

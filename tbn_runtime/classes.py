"""The VSPW label vocabulary: 124 class names in train-id order, the palette, the label mapping.

VSPW masks store 0 = others, 1..124 = classes, 255 = void. Train ids are value - 1, with 0 and
255 both mapped to the ignore index 255.
"""

import numpy as np

IGNORE_INDEX = 255

VSPW_CLASSES = (
    "wall", "ceiling", "door", "stair", "ladder", "escalator", "Playground_slide",
    "handrail_or_fence", "window", "rail", "goal", "pillar", "pole", "floor", "ground", "grass",
    "sand", "athletic_field", "road", "path", "crosswalk", "building", "house", "bridge", "tower",
    "windmill", "well_or_well_lid", "other_construction", "sky", "mountain", "stone", "wood", "ice",
    "snowfield", "grandstand", "sea", "river", "lake", "waterfall", "water",
    "billboard_or_Bulletin_Board", "sculpture", "pipeline", "flag", "parasol_or_umbrella",
    "cushion_or_carpet", "tent", "roadblock", "car", "bus", "truck", "bicycle", "motorcycle",
    "wheeled_machine", "ship_or_boat", "raft", "airplane", "tyre", "traffic_light", "lamp", "person",
    "cat", "dog", "horse", "cattle", "other_animal", "tree", "flower", "other_plant", "toy",
    "ball_net", "backboard", "skateboard", "bat", "ball", "cupboard_or_showcase_or_storage_rack",
    "box", "traveling_case_or_trolley_case", "basket", "bag_or_package", "trash_can", "cage",
    "plate", "tub_or_bowl_or_pot", "bottle_or_cup", "barrel", "fishbowl", "bed", "pillow",
    "table_or_desk", "chair_or_seat", "bench", "sofa", "shelf", "bathtub", "gun", "commode",
    "roaster", "other_machine", "refrigerator", "washing_machine", "Microwave_oven", "fan",
    "curtain", "textiles", "clothes", "painting_or_poster", "mirror", "flower_pot_or_vase", "clock",
    "book", "tool", "blackboard", "tissue", "screen_or_television", "computer", "printer",
    "Mobile_phone", "keyboard", "other_electronic_product", "fruit", "food", "instrument", "train",
)
NUM_CLASSES = len(VSPW_CLASSES)
assert NUM_CLASSES == 124


def make_palette(num_colors: int = 256) -> np.ndarray:
    """The PASCAL VOC bit-interleaved colour map: distinct, deterministic colours per id.

    Returns a (num_colors, 3) uint8 RGB array. Id 255 (ignore) is white so it stands out.
    """
    palette = np.zeros((num_colors, 3), dtype=np.uint8)
    for i in range(num_colors):
        c, r, g, b = i + 1, 0, 0, 0  # shifted by one so train id 0 (wall) is not black
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[i] = (r, g, b)
    if num_colors > IGNORE_INDEX:
        palette[IGNORE_INDEX] = (255, 255, 255)
    return palette


PALETTE = make_palette()

# Lookup table from raw VSPW mask values to train ids: 0 (others) and 255 (void) -> ignore.
_RAW_TO_TRAIN = np.full(256, IGNORE_INDEX, dtype=np.uint8)
_RAW_TO_TRAIN[1:NUM_CLASSES + 1] = np.arange(NUM_CLASSES, dtype=np.uint8)


def raw_to_train_ids(mask: np.ndarray) -> np.ndarray:
    """Map a raw VSPW mask (uint8, values 0..124 and 255) to train ids (0..123, ignore 255)."""
    return _RAW_TO_TRAIN[mask]


def train_ids_to_raw(ids: np.ndarray) -> np.ndarray:
    """Inverse of raw_to_train_ids for valid ids: train id k -> raw value k + 1; ignore -> 255."""
    ids = np.asarray(ids)
    return np.where(ids == IGNORE_INDEX, 255, ids.astype(np.int32) + 1).astype(np.uint8)

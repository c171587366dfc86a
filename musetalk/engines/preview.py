"""The preview engine: redraws the mouth with no neural network, in real time on a CPU.

It needs no weights and no GPU, so it shows a result on any machine; it is a preview, and
every result it makes is labelled ``preview``. Per output frame:

1. **Target shape** from the speech (``musetalk.visemes``): how open, how wide, how round;
   closed wherever the silence gate found no speech.
2. **Rig**: in the 256x256 crop, the source frame's mesh landmarks are measured in the
   mouth's own frame (centre between the lip corners, x along the lips, y down the face,
   unit = mouth width). The gap between the inner lips is set to the target opening: the
   lower lip takes three quarters of the change and the upper lip a quarter, the chin
   follows a third of it (no further than half the margin under the chin, so it stays in
   the crop), and the lip corners move out (spread) or in (rounded). The movement fades to
   nothing at the nose, at the cheeks and at the crop's edges, so the face outside the
   lower region is unchanged.
3. **Warp**: a piecewise-affine mesh (Delaunay triangles on those landmarks plus fixed points
   on the crop's edges) maps each pixel of the new face back to the source crop.
4. **Mouth**: inside the new inner-lip contour a dark cavity with soft shading (lit from the
   lips' own colour at the edge to dark in the throat) and, when wide open, a hint of the
   upper teeth; the edges are anti-aliased.

The pipeline pastes the crop back with the same masks as MuseTalk. Nothing random: the same
input gives the same output, and the shape curves are smoothed, so there is no flicker.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from musetalk import visemes
from musetalk.audio import SpeechSegments
from musetalk.engines import CROP_SIZE
from musetalk.face import NUM_LANDMARKS
from musetalk.timing import StageTimer

logger = logging.getLogger(__name__)

# Mesh landmarks of the lips, each contour from the left corner to the right one.
UPPER_INNER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308)
LOWER_INNER = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308)
LOWER_OUTER = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291)
MOUTH_CORNERS = (61, 291)
NOSE_BASE = 2  # under the nose tip: the upper lip's movement fades out here
CHIN = 152

# The widest opening, in mouth widths, between the inner lips at the middle.
MAX_OPENING = 0.36
# How the change of the lip gap is shared: the upper lip rises, the lower lip drops.
UPPER_SHARE, LOWER_SHARE = 0.25, 0.75
JAW_SHARE = 0.33  # of the gap change at the middle, taken by the chin
CHIN_MARGIN_USE = 0.5  # the chin moves at most this share of the crop's margin under it
# Lip corners move out by this share of half the mouth width at spread 1, in at spread -1.
SPREAD_OUT, SPREAD_IN = 0.10, 0.18
OPEN_LAYOUT = np.array([1.0, 0.0, 0.0])  # the shape whose triangles every shape uses (see render)
ROUND_NARROWING = 0.35  # a rounded opening is this much narrower than a relaxed one
# The landmarks the warp's mesh is built on: the 40 lip points, the face oval, the nose base,
# and others at least 0.13 mouth widths apart, nearest the mouth first (picked so on the
# frontal face of tests/data/face.jpg). Fewer points than the whole mesh, spread evenly,
# make about 180 triangles per frame instead of 500, for the same motion.
MESH_POINTS = np.array([
    0, 2, 4, 13, 14, 17, 36, 37, 39, 40, 58, 61, 78, 80, 81, 82, 84, 87, 88, 91, 95, 97, 102, 132, 136, 146,
    148, 149, 150, 152, 165, 172, 176, 178, 181, 185, 187, 191, 192, 194, 200, 201, 202, 204, 205, 206, 207,
    212, 214, 216, 220, 240, 267, 269, 270, 288, 291, 308, 310, 311, 312, 314, 317, 318, 321, 324, 326, 358,
    361, 365, 375, 377, 378, 379, 391, 397, 400, 402, 405, 409, 411, 415, 418, 421, 422, 424, 425, 426, 427,
    432, 434, 436, 440, 460,
])
# Landmarks above the nose base by more than this (mouth widths) are left out of the mesh.
MESH_TOP = 0.2
# ... and those further sideways than this (half mouth widths from the centre): nothing moves there.
MESH_SIDE = 3.0
EDGE_PX = 12.0  # mesh points this close to the crop's edge move less, and those on it not at all
EDGE_ANCHORS = 9  # fixed points along each side and the bottom of the crop
RIGS_KEPT = 64  # source frames whose rigs the engine keeps (a few kilobytes each)
_STATE_ROWS = CROP_SIZE + -(-NUM_LANDMARKS * 2 * 4 // (CROP_SIZE * 3))  # pixels, then landmark bytes

# Colours of the drawn mouth (RGB).
THROAT = np.array([24.0, 8.0, 10.0])
TEETH = np.array([222.0, 213.0, 198.0])
TEETH_FROM = 0.16  # opening (mouth widths) where the upper teeth begin to show
TEETH_FULL = 0.32  # ... and where they show most
TEETH_HEIGHT = 0.07  # mouth widths, at most
TEETH_OPACITY = 0.85  # a hint, not a grin


class PreviewEngine:
    name = "preview"
    # Its state is the crop itself, cheaper to cut again than to keep on disk: nothing is cached
    # but the face analysis, which the avatar cache keeps for every engine.
    cache_id = None

    def __init__(self):
        # Rigs of the source frames seen last: a photo, or a clip played forward and back, shows
        # the same source frame again and again, and its rig and triangles do not change.
        self._rigs: OrderedDict[bytes, MouthRig] = OrderedDict()

    # ------------------------------------------------------------------ audio

    def audio_features(self, wav: np.ndarray, speech: SpeechSegments | None, events: Sequence = (),
                       timer: StageTimer | None = None, turn=None) -> visemes.MouthTargets:
        """Mouth targets for the whole audio: visemes when phoneme timings came with it. No model and nothing
        shared is used (arithmetic on the audio alone), so no ``turn`` is taken: other jobs never wait for it."""
        timer = timer or StageTimer()
        with timer.stage("mouth_shapes"):
            if any(getattr(event, "kind", "") == "phoneme" for event in events or ()):
                return visemes.targets_from_phonemes(events, wav, speech)
            return visemes.targets_from_audio(wav, speech)

    def frame_audio(self, features: visemes.MouthTargets, positions: np.ndarray, fps: float, options) -> np.ndarray:
        """(open, spread, round) at the middle of each output frame: float32 [B, 3]."""
        return features.at((np.asarray(positions, dtype=np.float64) + 0.5) / fps)

    # ------------------------------------------------------------------ faces

    def prepare(self, crops: np.ndarray, landmarks: np.ndarray, timer: StageTimer):
        """The crops with their landmarks' bytes appended as extra rows: uint8 [B, 261, 256, 3]."""
        import torch

        crops = np.ascontiguousarray(crops, dtype=np.uint8)
        count = crops.shape[0]
        packed = np.zeros((count, _STATE_ROWS, CROP_SIZE, 3), np.uint8)
        packed[:, :CROP_SIZE] = crops
        points = np.ascontiguousarray(landmarks, dtype="<f4").reshape(count, -1).view(np.uint8)
        packed[:, CROP_SIZE:].reshape(count, -1)[:, : points.shape[1]] = points
        return torch.from_numpy(packed)

    def generate(self, states, frame_audio: np.ndarray, timer: StageTimer) -> np.ndarray:
        with timer.stage("render"):
            packed = np.asarray(states)
            count = packed.shape[0]
            size = NUM_LANDMARKS * 2 * 4
            points = packed[:, CROP_SIZE:].reshape(count, -1)[:, :size].copy().view("<f4").reshape(count, -1, 2)
            return np.stack([render(packed[k, :CROP_SIZE], points[k], frame_audio[k], self._rig(points[k]))
                             for k in range(count)])

    def _rig(self, landmarks: np.ndarray) -> MouthRig:
        key = landmarks.tobytes()
        rig = self._rigs.pop(key, None) or MouthRig(landmarks)
        self._rigs[key] = rig
        while len(self._rigs) > RIGS_KEPT:
            self._rigs.popitem(last=False)
        return rig


# --------------------------------------------------------------------------- the rig


@dataclass
class MouthFrame:
    """The mouth's own coordinates in one crop: ``xi`` -1 .. 1 between the lip corners,
    ``eta`` down the face, in mouth widths from the corners' midpoint."""

    centre: np.ndarray  # [2]
    along: np.ndarray  # [2] unit vector, left corner to right corner
    down: np.ndarray  # [2] unit vector, perpendicular, towards the chin
    width: float  # pixels between the corners

    @classmethod
    def of(cls, points: np.ndarray) -> MouthFrame:
        left, right = points[MOUTH_CORNERS[0]], points[MOUTH_CORNERS[1]]
        along = right - left
        width = float(np.hypot(*along))
        along = along / max(width, 1e-6)
        return cls((left + right) / 2, along, np.array([-along[1], along[0]]), max(width, 1.0))

    def xi(self, points: np.ndarray) -> np.ndarray:
        return (points - self.centre) @ self.along / (self.width / 2)

    def eta(self, points: np.ndarray) -> np.ndarray:
        return (points - self.centre) @ self.down / self.width


class MouthRig:
    """How the mesh points of one source crop move for a mouth shape (module docstring, step 2).

    Everything that depends only on the source landmarks is measured once here; ``move(shape)``
    gives the points' new positions for a shape (open, spread, round).
    """

    def __init__(self, landmarks: np.ndarray):
        points = np.asarray(landmarks, dtype=np.float64)
        frame = self.frame = MouthFrame.of(points)
        xi, eta = frame.xi(points), frame.eta(points)
        chosen = (eta[MESH_POINTS] >= eta[NOSE_BASE] - MESH_TOP) & (np.abs(xi[MESH_POINTS]) <= MESH_SIDE)
        self.indices = MESH_POINTS[chosen]  # the landmarks that take part
        self.points = points[self.indices]
        self.xi, self.eta = xi[self.indices], eta[self.indices]

        # The inner lips, pair by pair (upper and lower point at about the same place along the mouth).
        upper, lower = list(UPPER_INNER[1:-1]), list(LOWER_INNER[1:-1])
        order = np.argsort(xi[upper])
        self.pair_xi = xi[upper][order]
        self.gap_now = np.maximum((points[lower] - points[upper]) @ frame.down, 0.0)[order]
        self.corner_xi = float(np.abs(xi[[UPPER_INNER[0], UPPER_INNER[-1]]]).mean())
        slit = np.interp(self.xi, self.pair_xi, ((eta[upper] + eta[lower]) / 2)[order])

        # Above the lips' meeting line (the slit) the upper lip rises, fading out at the nose;
        # below it the lower lip drops and hands over to the jaw towards the chin.
        side = np.full(NUM_LANDMARKS, -1)
        side[upper], side[lower] = 0, 1
        self.is_lower = np.where(side[self.indices] >= 0, side[self.indices] == 1, self.eta > slit)
        nose = eta[NOSE_BASE]
        self.rise = np.clip((self.eta - nose) / np.maximum(slit - nose, 1e-3), 0.0, 1.0)
        lip_xi, lip_eta = xi[list(LOWER_OUTER)], eta[list(LOWER_OUTER)]
        lower_lip = np.interp(self.xi, np.sort(lip_xi), lip_eta[np.argsort(lip_xi)])
        chin = eta[CHIN]
        self.towards_chin = np.clip((self.eta - lower_lip) / np.maximum(chin - lower_lip, 1e-3), 0.0, 1.0)
        # The chin may use half the crop's margin under it; under the chin the movement fades
        # out at the crop's bottom edge, and sideways towards the ears.
        self.chin_room = CHIN_MARGIN_USE * max(CROP_SIZE - points[CHIN, 1], 0.0)
        below = np.clip((CROP_SIZE - self.points[:, 1]) / max(CROP_SIZE - points[CHIN, 1], 1.0), 0.0, 1.0)
        self.jaw_weight = np.clip(1 - (self.xi / 2.5) ** 2, 0.0, 1.0) * np.where(self.eta > chin, below, 1.0)
        # Spreading and rounding move the lips sideways, fading out at the nose above and over
        # 0.75 mouth widths below.
        beyond = np.sign(self.xi) * np.clip(1 - (np.abs(self.xi) - 1) / 0.9, 0.0, 1.0)
        nearness = np.where(self.is_lower, 1 - _smoothstep(np.abs(self.eta - slit) / 0.75), self.rise)
        self.sideways_weight = np.where(np.abs(self.xi) <= 1, self.xi, beyond) * nearness
        # Nothing moves at the crop's edges: that is where the crop meets the rest of the frame.
        x, y = self.points[:, 0], self.points[:, 1]
        self.pinned = np.clip(np.minimum.reduce([x, CROP_SIZE - 1 - x, CROP_SIZE - 1 - y]) / EDGE_PX, 0.0, 1.0)

        # The warp's mesh: these points and fixed ones around them. The triangles are those of the
        # mouth wide open: there the space between the lips is empty, so no triangle joins a lip to
        # the other lip's far side; the same triangles stay valid as the mouth closes, and the ones
        # between the lips are then covered by the drawn mouth.
        self.anchors = edge_anchors(self.points[:, 1].min() - 2.0)
        self.mesh_points = np.concatenate([self.points, self.anchors])
        self.triangles = triangulate(np.concatenate([self.move(OPEN_LAYOUT), self.anchors]))

    def move(self, shape: np.ndarray) -> np.ndarray:
        """[len(indices), 2] positions of the mesh points for ``shape`` (open, spread, round)."""
        opening, spread, roundness = (float(v) for v in shape)
        frame = self.frame
        half_width = max(self.corner_xi * (1 - ROUND_NARROWING * roundness), 0.2)
        profile = np.sqrt(np.clip(1 - (self.pair_xi / half_width) ** 2, 0.0, 1.0))
        knots = np.concatenate([[-self.corner_xi], self.pair_xi, [self.corner_xi]])
        change = np.concatenate([[0.0], opening * MAX_OPENING * frame.width * profile - self.gap_now, [0.0]])
        change_at = np.interp(self.xi, knots, change, left=0.0, right=0.0)
        jaw = np.clip(JAW_SHARE * np.interp(0.0, knots, change), -self.chin_room, self.chin_room)
        down = np.where(self.is_lower,
                        LOWER_SHARE * change_at * (1 - self.towards_chin) + jaw * self.jaw_weight * self.towards_chin,
                        -UPPER_SHARE * change_at * self.rise)
        sideways = (SPREAD_OUT if spread > 0 else SPREAD_IN) * spread * frame.width / 2 * self.sideways_weight
        shift = down[:, None] * frame.down + sideways[:, None] * frame.along
        return self.points + shift * self.pinned[:, None]


# --------------------------------------------------------------------------- the warp


def edge_anchors(top: float) -> np.ndarray:
    """Fixed points around the mesh: along the crop's sides and bottom from ``top`` down, and
    across the crop at ``top``, so no triangle reaches above the mesh."""
    top = float(np.clip(top, 0.0, CROP_SIZE - 2.0))
    last = CROP_SIZE - 1.0
    across = np.linspace(0.0, last, EDGE_ANCHORS)
    down = np.linspace(top, last, EDGE_ANCHORS)
    sides = [np.stack([np.zeros_like(down), down], 1), np.stack([np.full_like(down, last), down], 1),
             np.stack([across, np.full_like(across, last)], 1), np.stack([across, np.full_like(across, top)], 1)]
    return np.unique(np.concatenate(sides), axis=0)


def triangulate(points: np.ndarray) -> np.ndarray:
    """Delaunay triangles [T, 3] (indices into ``points``)."""
    import cv2

    rounded = np.ascontiguousarray(points, dtype=np.float32)
    low, high = rounded.min(axis=0) - 2, rounded.max(axis=0) + 2
    subdiv = cv2.Subdiv2D((int(np.floor(low[0])), int(np.floor(low[1])),
                           int(np.ceil(high[0] - low[0])) + 1, int(np.ceil(high[1] - low[1])) + 1))
    subdiv.insert(rounded)
    corners = np.ascontiguousarray(subdiv.getTriangleList(), dtype=np.float32).reshape(-1, 2)
    # Subdiv2D gives corner coordinates: find each one's point by its exact bits (the first
    # of equal points; corners that are not points belong to its outer virtual triangle).
    keys = rounded.view(np.uint64).ravel()
    order = np.argsort(keys, kind="stable")
    wanted = corners.view(np.uint64).ravel()
    slots = np.clip(np.searchsorted(keys[order], wanted), 0, len(keys) - 1)
    found = keys[order][slots] == wanted
    triangles = np.where(found, order[slots], -1).reshape(-1, 3)
    return triangles[(triangles >= 0).all(axis=1)]


_GRID_Y, _GRID_X = np.mgrid[0:CROP_SIZE, 0:CROP_SIZE].astype(np.float32)


def warp(crop: np.ndarray, source: np.ndarray, target: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """``crop`` warped so that each ``source`` point lands on its ``target``, piecewise affine
    over ``triangles`` [T, 3]; pixels no moving triangle covers keep their values."""
    import cv2

    moves = np.abs(target - source).max(axis=1) > 0
    triangles = triangles[moves[triangles].any(axis=1)]
    to, frm = target[triangles], source[triangles]  # [T, 3, 2]
    # The affine map of each triangle from target to source, from the edge vectors at corner 0.
    edges_to = (to[:, 1:] - to[:, :1]).transpose(0, 2, 1)  # [T, 2, 2], columns = edges
    edges_from = (frm[:, 1:] - frm[:, :1]).transpose(0, 2, 1)
    det = edges_to[:, 0, 0] * edges_to[:, 1, 1] - edges_to[:, 0, 1] * edges_to[:, 1, 0]
    usable = np.abs(det) > 0.1  # twice the area: triangles squeezed to a line cover no pixel
    if not usable.any():
        return crop.copy()
    to, frm, edges_to, edges_from, det = to[usable], frm[usable], edges_to[usable], edges_from[usable], det[usable]
    inverse = np.stack([np.stack([edges_to[:, 1, 1], -edges_to[:, 0, 1]], 1),
                        np.stack([-edges_to[:, 1, 0], edges_to[:, 0, 0]], 1)], 1) / det[:, None, None]
    linear = edges_from @ inverse  # [T, 2, 2]: target offset -> source offset
    offset = frm[:, 0] - np.einsum("tij,tj->ti", linear, to[:, 0])
    matrices = np.concatenate([linear, offset[:, :, None]], axis=2).astype(np.float32)  # [T, 2, 3]

    x1, y1 = np.clip(np.floor(to.reshape(-1, 2).min(axis=0)).astype(int) - 1, 0, CROP_SIZE)
    x2, y2 = np.clip(np.ceil(to.reshape(-1, 2).max(axis=0)).astype(int) + 2, 0, CROP_SIZE)
    if x2 <= x1 or y2 <= y1:
        return crop.copy()
    # Each pixel's owner triangle; pixels no triangle covers take the identity, the row after the last.
    identity = len(matrices)
    owner = np.full((y2 - y1, x2 - x1), identity, np.int32)
    shift = 4  # sub-pixel vertex positions: coordinates in 1/16 pixel
    for index, corners in enumerate(np.rint((to - [x1, y1]) * (1 << shift)).astype(np.int32)):
        cv2.fillConvexPoly(owner, corners, index, lineType=cv2.LINE_8, shift=shift)
    coefficients = np.concatenate([matrices.reshape(-1, 6), [[1, 0, 0, 0, 1, 0]]]).astype(np.float32)
    per_pixel = coefficients[owner]  # [h, w, 6]
    xs, ys = _GRID_X[y1:y2, x1:x2], _GRID_Y[y1:y2, x1:x2]
    map_x = per_pixel[..., 0] * xs + per_pixel[..., 1] * ys + per_pixel[..., 2]
    map_y = per_pixel[..., 3] * xs + per_pixel[..., 4] * ys + per_pixel[..., 5]
    # Where a pixel moves less than 1/100 pixel it stays exactly itself (rounding noise of the maps),
    # and so do the crop's edges (a pixel there may be drawn by a triangle that only touches it).
    still = (np.abs(map_x - xs) < 0.01) & (np.abs(map_y - ys) < 0.01)
    still |= (xs == 0) | (xs == CROP_SIZE - 1) | (ys == CROP_SIZE - 1)
    map_x[still], map_y[still] = xs[still], ys[still]
    out = crop.copy()
    out[y1:y2, x1:x2] = cv2.remap(crop, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return out


# --------------------------------------------------------------------------- the mouth


def _smoothstep(values: np.ndarray) -> np.ndarray:
    values = np.clip(values, 0.0, 1.0)
    return values * values * (3 - 2 * values)


def draw_mouth(image: np.ndarray, moved: dict[int, np.ndarray], frame: MouthFrame, opening: float) -> np.ndarray:
    """The cavity (and upper teeth when wide open) inside the inner-lip contour at ``moved``
    (landmark index -> position); ``opening``: the gap wanted at the middle, in mouth widths."""
    import cv2

    gap_px = opening * frame.width
    if gap_px < 0.75:
        return image
    contour = np.array([moved[i] for i in UPPER_INNER] + [moved[i] for i in LOWER_INNER[-2:0:-1]])
    pad = 3
    x1, y1 = np.clip(np.floor(contour.min(axis=0)).astype(int) - pad, 0, CROP_SIZE)
    x2, y2 = np.clip(np.ceil(contour.max(axis=0)).astype(int) + pad + 1, 0, CROP_SIZE)
    if x2 - x1 < 2 or y2 - y1 < 2:
        return image
    shift = 3  # polygon corners in 1/8 pixel
    inside = np.zeros((y2 - y1, x2 - x1), np.uint8)
    cv2.fillPoly(inside, [np.rint((contour - [x1, y1]) * (1 << shift)).astype(np.int32)], 255, cv2.LINE_AA, shift)
    alpha = cv2.GaussianBlur(inside.astype(np.float32) / 255.0, (3, 3), 0.6)
    # Lit at the lips, dark in the throat: shade by the distance from the contour.
    distance = cv2.distanceTransform((inside > 127).astype(np.uint8), cv2.DIST_L2, 3)
    shade = _smoothstep(distance / max(1.5, 0.4 * gap_px))[..., None]
    patch = image[y1:y2, x1:x2].astype(np.float32)
    # The lit edge is the lips' own colour darkened: it fits any skin and any lipstick.
    edge = 0.5 * (patch[inside > 0].mean(axis=0) if (inside > 0).any() else THROAT)
    colour = edge + (THROAT - edge) * shade
    teeth = _teeth_alpha(moved, frame, x1, y1, inside.shape, gap_px)
    if teeth is not None:
        # Darker towards the corners, where the row of teeth turns away from the light.
        rows, cols = np.mgrid[y1:y2, x1:x2]
        across = frame.xi(np.stack([cols, rows], axis=-1).reshape(-1, 2)).reshape(inside.shape)
        lit = TEETH * (0.8 + 0.2 * shade) * (1 - 0.4 * np.clip(across, -1, 1) ** 2)[..., None]
        colour = colour + (lit - colour) * teeth[..., None]
    out = image.copy()
    out[y1:y2, x1:x2] = np.clip(np.rint(patch + (colour - patch) * alpha[..., None]), 0, 255).astype(np.uint8)
    return out


def _teeth_alpha(moved, frame: MouthFrame, x1: int, y1: int, shape, gap_px: float) -> np.ndarray | None:
    """Where the upper teeth show under the upper lip (0..1 over the patch), or None while the
    mouth is not open enough to show them."""
    import cv2

    visible = _smoothstep(np.array((gap_px / frame.width - TEETH_FROM) / (TEETH_FULL - TEETH_FROM)))
    if visible <= 0:
        return None
    lip = np.array([moved[i] for i in UPPER_INNER[2:-2]])  # the middle of the upper lip, corners left out
    across = frame.xi(lip)
    # Rounded at the ends, as the row of teeth turns away towards the corners.
    height = min(TEETH_HEIGHT * frame.width, 0.3 * gap_px) * np.sqrt(np.clip(1 - (across / 0.7) ** 2, 0.05, 1))
    lower_edge = lip + height[:, None] * frame.down
    band = np.concatenate([lip - frame.down, lower_edge[::-1]]) - [x1, y1]
    shift = 3
    mask = np.zeros(shape, np.uint8)
    cv2.fillPoly(mask, [np.rint(band * (1 << shift)).astype(np.int32)], 255, cv2.LINE_AA, shift)
    return cv2.GaussianBlur(mask.astype(np.float32) / 255.0, (3, 3), 0.8) * TEETH_OPACITY * float(visible)


def render(crop: np.ndarray, landmarks: np.ndarray, shape: np.ndarray, rig: MouthRig | None = None) -> np.ndarray:
    """One new 256x256 face crop: the mouth of ``crop`` (landmarks [468, 2] in crop pixels) set
    to ``shape`` (open, spread, round). ``rig``: ``MouthRig(landmarks)``, when already made."""
    rig = rig or MouthRig(landmarks)
    moved = rig.move(shape)
    warped = warp(crop, rig.mesh_points, np.concatenate([moved, rig.anchors]), rig.triangles)
    return draw_mouth(warped, dict(zip(rig.indices.tolist(), moved)), rig.frame, float(shape[0]) * MAX_OPENING)

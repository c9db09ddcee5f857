"""``streets``: a procedural street-scene generator with Cityscapes train ids.

``render_street(seed, height, width)`` draws one scene, deterministically for a seed (numpy
``default_rng(seed)`` only): sky (flat gradient), a row of buildings with window grids, trees,
a road in perspective with lane markings, sidewalks with tiles, terrain, poles with traffic
signs, cars and people; then lighting jitter and sensor noise. Labels are the
19 Cityscapes train ids (``CITYSCAPES_CLASSES``); the image colours are plausible appearance
colours, while ``CITYSCAPES_COLORS`` (the official palette) is used to draw label maps.

Large flat areas (sky, road, walls) next to detailed objects make the sparsity trade-off real:
an edge-based activity mask at 25 % density covers the object boundaries and the textures, and
the flat areas are left to the sparse U-Net's coarse level.
"""
from __future__ import annotations

import numpy as np

# train id -> (name, colour) — Cityscapes' 19 evaluation classes
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)
CITYSCAPES_COLORS = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)
IGNORE_INDEX = 255
ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY, PERSON = range(12)
CAR = 13
STREET_CLASSES = (ROAD, SIDEWALK, BUILDING, POLE, SIGN, VEGETATION, TERRAIN, SKY, PERSON, CAR)


def colorize(labels: np.ndarray) -> np.ndarray:
    """Label map [H, W] (train ids, 255 = ignore -> black) -> uint8 RGB [H, W, 3]."""
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(CITYSCAPES_COLORS)] = CITYSCAPES_COLORS
    return lut[np.asarray(labels, dtype=np.uint8)]


def _noise(rng, h, w, scale, amp):
    """Smooth-ish value noise: coarse random grid, bilinearly upsampled, times ``amp``."""
    gh, gw = max(2, h // scale + 2), max(2, w // scale + 2)
    g = rng.standard_normal((gh, gw)).astype(np.float32)
    ys = np.linspace(0, gh - 1.001, h)
    xs = np.linspace(0, gw - 1.001, w)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    a = g[y0][:, x0] * (1 - fx) + g[y0][:, x0 + 1] * fx
    b = g[y0 + 1][:, x0] * (1 - fx) + g[y0 + 1][:, x0 + 1] * fx
    return (a * (1 - fy) + b * fy) * amp


def render_street(seed: int, height: int = 64, width: int = 128):
    """One scene: ``(image float32 [H, W, 3] in [0, 1], labels uint8 [H, W] train ids)``."""
    rng = np.random.default_rng(seed)
    H, W = height, width
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32) + 0.5
    img = np.zeros((H, W, 3), np.float32)
    lab = np.full((H, W), SKY, np.uint8)

    def paint(m, color, label=None, tex=None):
        c = np.asarray(color, np.float32)
        if tex is None:
            img[m] = c
        else:
            img[m] = c + tex[m][:, None]
        if label is not None:
            lab[m] = label

    # ---- sky: flat vertical gradient
    hz = rng.uniform(0.36, 0.5) * H  # horizon row
    sky_top = np.array([0.35, 0.55, 0.85]) + rng.uniform(-0.08, 0.08, 3)
    sky_bot = np.array([0.75, 0.82, 0.92]) + rng.uniform(-0.05, 0.05, 3)
    a = np.clip(yy / max(hz, 1), 0, 1)[..., None]
    img[:] = sky_top * (1 - a) + sky_bot * a

    # ---- buildings: a row of facades with window grids; some gaps show sky
    x = -rng.uniform(0, 0.1) * W
    while x < W:
        bw = rng.uniform(0.12, 0.35) * W
        if rng.random() < 0.15:  # a gap
            x += bw * 0.6
            continue
        top = rng.uniform(0.02, 0.75) * hz
        m = (xx >= x) & (xx < x + bw) & (yy >= top)
        base = rng.choice([[0.62, 0.55, 0.45], [0.5, 0.5, 0.52], [0.6, 0.38, 0.3], [0.75, 0.72, 0.65]])
        base = np.asarray(base) + rng.uniform(-0.07, 0.07, 3)
        paint(m, base, BUILDING, _noise(rng, H, W, 3, 0.025))
        # windows
        sx, sy = rng.uniform(0.035, 0.07) * W, rng.uniform(0.07, 0.13) * H
        wx, wy = rng.uniform(0.35, 0.6) * sx, rng.uniform(0.35, 0.6) * sy
        win = m & (((xx - x) % sx) < wx) & (((yy - top) % sy) < wy) & (yy > top + sy * 0.4) \
            & (xx > x + sx * 0.3) & (xx < x + bw - sx * 0.3)
        paint(win, np.array([0.2, 0.25, 0.32]) + rng.uniform(-0.06, 0.06, 3))
        x += bw

    # ---- trees (behind the street furniture)
    for _ in range(rng.integers(0, 4)):
        cx, cy = rng.uniform(0, W), rng.uniform(0.45, 0.95) * hz
        rx, ry = rng.uniform(0.06, 0.14) * W, rng.uniform(0.12, 0.25) * H
        trunk = (np.abs(xx - cx) < max(0.8, 0.012 * W)) & (yy > cy) & (yy < hz + 0.08 * H)
        paint(trunk, [0.3, 0.22, 0.15], VEGETATION)
        crown = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 + _noise(rng, H, W, 3, 0.25) < 1
        green = np.array([0.25, 0.45, 0.15]) + rng.uniform(-0.06, 0.06, 3)
        paint(crown, green, VEGETATION, _noise(rng, H, W, 1, 0.08) + _noise(rng, H, W, 4, 0.05))

    # ---- ground: terrain strip, sidewalks, road (perspective around a vanishing point)
    below = yy >= hz
    t = np.clip((yy - hz) / (H - hz), 0, 1)  # 0 at the horizon, 1 at the bottom row
    vx = rng.uniform(0.35, 0.65) * W
    xc = vx + (W / 2 - vx) * t
    hw = t * rng.uniform(0.5, 0.75) * W + 0.5
    sw = t * rng.uniform(0.15, 0.3) * W + 0.5
    d = np.abs(xx - xc)
    terrain = below & (d >= hw + sw) & (lab != BUILDING) & (lab != VEGETATION)
    paint(terrain, np.array([0.45, 0.5, 0.3]) + rng.uniform(-0.05, 0.05, 3), TERRAIN,
          _noise(rng, H, W, 2, 0.05))
    side = below & (d >= hw) & (d < hw + sw)
    tiles = ((xx.astype(int) % 4 == 0) | (yy.astype(int) % 3 == 0)) * -0.06
    paint(side, np.array([0.68, 0.62, 0.62]) + rng.uniform(-0.05, 0.05, 3), SIDEWALK,
          tiles + _noise(rng, H, W, 2, 0.015))
    road = below & (d < hw)
    paint(road, np.array([0.36, 0.36, 0.38]) + rng.uniform(-0.06, 0.06, 3), ROAD,
          _noise(rng, H, W, 6, 0.012))
    dash = road & (d < 0.012 * W * t + 0.35) & (np.sin(1.0 / (t + 0.06) * 6.0) > 0)
    paint(dash, [0.9, 0.9, 0.88])  # lane markings belong to the road

    def ground_x(tt, side_sign, offset):
        """x of a point at depth ``tt`` at ``offset`` x sidewalk width beyond the road edge."""
        c = vx + (W / 2 - vx) * tt
        h = tt * (hw.max() - 0.5) + 0.5
        s = tt * (sw.max() - 0.5) + 0.5
        return c + side_sign * (h + offset * s), hz + tt * (H - hz)

    # ---- poles with traffic signs
    for _ in range(rng.integers(1, 5)):
        tt = rng.uniform(0.15, 0.9)
        px, py = ground_x(tt, rng.choice([-1, 1]), rng.uniform(0.3, 0.8))
        ph = (0.25 + 0.45 * tt) * H
        pw = max(1.0, 0.012 * W * (0.5 + tt))
        pole = (np.abs(xx - px) < pw / 2 + 0.25) & (yy < py) & (yy > py - ph)
        paint(pole, [0.35, 0.35, 0.37], POLE)
        s = max(3.5, 0.08 * H * (0.5 + tt))
        if rng.random() < 0.85:  # traffic sign: a coloured disc or square on top
            cy = py - ph - s * 0.4
            if rng.random() < 0.5:
                sign = ((xx - px) ** 2 + (yy - cy) ** 2) < (s * 0.5) ** 2
            else:
                sign = (np.abs(xx - px) < s * 0.5) & (np.abs(yy - cy) < s * 0.5)
            paint(sign, rng.choice([[0.9, 0.8, 0.1], [0.1, 0.3, 0.8], [0.85, 0.1, 0.1], [0.95, 0.95, 0.95]]), SIGN)

    # ---- cars (far to near), on the road
    cars = sorted(rng.uniform(0.2, 1.0, rng.integers(0, 5)))
    for tt in cars:
        c = vx + (W / 2 - vx) * tt
        h = tt * (hw.max() - 0.5) + 0.5
        cx = c + rng.uniform(-0.75, 0.75) * h
        cw = (0.12 + 0.25 * tt) * W * rng.uniform(0.8, 1.1)
        ch = cw * rng.uniform(0.45, 0.6)
        by = hz + tt * (H - hz)
        body = (np.abs(xx - cx) < cw / 2) & (yy < by) & (yy > by - ch * 0.55)
        cabin = (np.abs(xx - cx) < cw * 0.32) & (yy <= by - ch * 0.55) & (yy > by - ch)
        color = rng.choice([[0.7, 0.1, 0.1], [0.1, 0.2, 0.6], [0.85, 0.85, 0.85], [0.1, 0.1, 0.1],
                            [0.5, 0.5, 0.5], [0.9, 0.7, 0.1]])
        paint(body | cabin, np.asarray(color) + rng.uniform(-0.05, 0.05, 3), CAR, _noise(rng, H, W, 2, 0.02))
        paint(cabin & (np.abs(xx - cx) < cw * 0.27) & (yy > by - ch * 0.95), [0.25, 0.3, 0.38])
        for sgn in (-1, 1):
            wheel = ((xx - (cx + sgn * cw * 0.3)) ** 2 + (yy - by) ** 2) < (ch * 0.2) ** 2
            paint(wheel & (yy < by + ch * 0.05), [0.05, 0.05, 0.05], CAR)

    # ---- people on the sidewalks
    for _ in range(rng.integers(0, 4)):
        tt = rng.uniform(0.3, 1.0)
        px, py = ground_x(tt, rng.choice([-1, 1]), rng.uniform(0.2, 0.8))
        ph = (0.12 + 0.3 * tt) * H
        pw = ph / 3.2
        body = (np.abs(xx - px) < pw / 2) & (yy < py) & (yy > py - ph * 0.8)
        legs = body & (yy > py - ph * 0.4) & (np.abs(xx - px) < pw * 0.1)
        head = ((xx - px) ** 2 + (yy - (py - ph * 0.88)) ** 2) < (ph * 0.11) ** 2
        paint(body, rng.uniform(0.05, 0.8, 3), PERSON)
        paint(head, [0.85, 0.65, 0.5], PERSON)
        img[legs] = img[legs] * 0.5

    # ---- lighting, vignetting-free sensor noise
    img = img * rng.uniform(0.8, 1.15) + rng.uniform(-0.05, 0.05, 3)
    img = img + rng.standard_normal(img.shape).astype(np.float32) * 0.012
    return np.clip(img, 0, 1).astype(np.float32), lab

"""The 3D shapes world: one to three coloured primitives standing on a ground disc, seen from orbiting cameras.

A scene holds spheres, cubes and cones in red, green, blue or yellow, standing on the ground
plane z = 0 inside a radius, never overlapping, each with its prompt ("two red spheres and a
blue cube"). Every primitive becomes a few dozen isotropic Gaussians on its surface, coloured
by a fixed light (view-independent Lambertian shading, so the objects look solid from every
side), and a scene is rendered by :mod:`rewardiff.render` over :func:`ground`: a light grey
disc of radius :data:`GROUND_RADIUS` on a white sky, computed per pixel as a background (so
score distillation, which optimises only the objects' Gaussians, renders the same ground).
The world is deterministic: the same seed gives the same scenes, cameras and images.
"""

from __future__ import annotations

import functools
import math
import random as _random
from dataclasses import dataclass
from itertools import combinations_with_replacement

import numpy as np
import torch

from rewardiff.render import Camera, Gaussians, render_views
from rewardiff.worlds.shapes.data import tokenize_with

SIZE = 32
COLORS = ("red", "green", "blue", "yellow")
COLOR_RGB = np.array([[0.88, 0.14, 0.14], [0.14, 0.74, 0.22], [0.18, 0.34, 0.92], [0.93, 0.84, 0.14]], dtype=np.float32)
SHAPES = ("sphere", "cube", "cone")
PLURALS = ("spheres", "cubes", "cones")
COUNT_WORDS = ("a", "two", "three")
MAX_OBJECTS = 3
# Sizes (world units; the camera sits 4 away with a 40 degree field of view, so the image spans
# about 2.9 units at the origin): the radius of a sphere, half the side of a cube, the base
# radius of a cone (its height is twice that). Each object is scaled by up to SIZE_JITTER.
RADIUS = {0: 0.22, 1: 0.19, 2: 0.23}
SIZE_JITTER = 0.08
PLACE_RADIUS = 1.15  # object centres lie within this distance of the origin
MIN_DISTANCE = 1.5  # between the centres of any two objects: far enough apart that, from most views,
# one object's silhouette clears the other's (see the judge on occlusion)
GROUND_RADIUS = 1.7
GROUND_RGB = (0.72, 0.72, 0.72)
SKY_RGB = (1.0, 1.0, 1.0)
LIGHT = np.array([0.35, 0.25, 0.9]) / np.linalg.norm([0.35, 0.25, 0.9])  # direction towards the light
AMBIENT = 0.55  # shade = AMBIENT + (1 - AMBIENT) max(0, n . LIGHT)
OPACITY = 0.95
ELEVATION = (10.0, 40.0)  # random cameras' elevation range, degrees
HELD_OUT_SEED = 0
HELD_OUT_PAIRS = 6  # pairs of kinds that never appear together in a training prompt
VOCAB = ("<pad>", "<null>") + COUNT_WORDS + COLORS + SHAPES + PLURALS + ("and",)
MAX_TOKENS = 11  # "a red sphere and a green cone and a blue cube"

Group = tuple[int, str, str]  # (count, colour, shape), as a prompt states it


@dataclass(frozen=True)
class Primitive:
    """One object: ``shape`` and ``color`` index :data:`SHAPES` / :data:`COLORS`; it stands on the
    ground at (x, y) with size ``radius`` (see :data:`RADIUS`)."""

    shape: int
    color: int
    x: float
    y: float
    radius: float


@dataclass(frozen=True)
class Scene:
    """The objects of one scene."""

    objects: tuple[Primitive, ...]


# ----------------------------------------------------------------------------- prompts


def _kinds() -> list[tuple[int, int]]:
    """Every (colour, shape) kind, in a fixed order."""
    return [(c, s) for c in range(len(COLORS)) for s in range(len(SHAPES))]


def _canonical(kinds: list[tuple[int, int]]) -> list[Group]:
    """Groups of a multiset of (colour, shape) kinds: larger counts first, then colour, then shape."""
    counts: dict[tuple[int, int], int] = {}
    for k in kinds:
        counts[k] = counts.get(k, 0) + 1
    order = sorted(counts, key=lambda k: (-counts[k], k[0], k[1]))
    return [(counts[k], COLORS[k[0]], SHAPES[k[1]]) for k in order]


def prompt_of_groups(groups: list[Group]) -> str:
    """The prompt that states ``groups``, in the order given."""
    return " and ".join(f"{COUNT_WORDS[n - 1]} {c} {(PLURALS if n > 1 else SHAPES)[SHAPES.index(s)]}" for n, c, s in groups)


def prompt_of(scene: Scene) -> str:
    """The canonical prompt of a scene (larger groups first, then palette order, then shape order)."""
    return prompt_of_groups(_canonical([(o.color, o.shape) for o in scene.objects]))


def parse_prompt(prompt: str) -> list[Group]:
    """``[(count, colour, shape), ...]`` of a prompt such as "two red spheres and a blue cube";
    raises ``ValueError`` naming the prompt when it is not one of the world's."""
    groups: list[Group] = []
    words = prompt.strip().lower().split()
    parts = " ".join(words).split(" and ")
    for part in parts:
        w = part.split()
        ok = len(w) == 3 and w[0] in COUNT_WORDS and w[1] in COLORS
        n = COUNT_WORDS.index(w[0]) + 1 if ok else 0
        nouns = PLURALS if n > 1 else SHAPES
        if not ok or w[2] not in nouns:
            raise ValueError(f"not a shapes3d prompt: {prompt!r} (expected e.g. 'two red spheres and a blue cube')")
        groups.append((n, w[1], SHAPES[nouns.index(w[2])]))
    kinds = [(c, s) for _, c, s in groups]
    if len(set(kinds)) < len(kinds) or sum(n for n, _, _ in groups) > MAX_OBJECTS:
        raise ValueError(f"not a shapes3d prompt: {prompt!r} (at most {MAX_OBJECTS} objects, each kind named once)")
    return groups


def kinds_of(prompt: str) -> list[tuple[int, int]]:
    """The prompt's objects as (colour, shape) indices, one entry an object."""
    return [(COLORS.index(c), SHAPES.index(s)) for n, c, s in parse_prompt(prompt) for _ in range(n)]


def is_prompt(prompt: str) -> bool:
    """Whether ``prompt`` is one of the world's prompts."""
    try:
        parse_prompt(prompt)
        return True
    except ValueError:
        return False


def all_prompts() -> list[str]:
    """Every prompt of the world (454: every multiset of one to three of the 12 kinds)."""
    out = []
    for n in range(1, MAX_OBJECTS + 1):
        out += [prompt_of_groups(_canonical(list(m))) for m in combinations_with_replacement(_kinds(), n)]
    return out


@functools.lru_cache(maxsize=1)
def held_out_pairs() -> tuple[tuple[tuple[int, int], tuple[int, int]], ...]:
    """The pairs of distinct kinds that no training prompt holds together (seeded choice)."""
    pairs = [(a, b) for i, a in enumerate(_kinds()) for b in _kinds()[i + 1:]]
    return tuple(_random.Random(HELD_OUT_SEED).sample(pairs, HELD_OUT_PAIRS))


def _held_out(prompt: str) -> bool:
    kinds = set(kinds_of(prompt))
    return any(a in kinds and b in kinds for a, b in held_out_pairs())


def train_prompts() -> list[str]:
    """The prompts to train on: every prompt without a held-out pair of kinds."""
    return [p for p in all_prompts() if not _held_out(p)]


def held_out_prompts() -> list[str]:
    """Prompts that combine kinds never seen together in training (every kind itself is trained on)."""
    return [p for p in all_prompts() if _held_out(p)]


def tokenize(prompts: list[str]) -> torch.Tensor:
    """Token ids [B, MAX_TOKENS]; the empty prompt "" is the unconditional ``<null>`` prompt."""
    return tokenize_with(prompts, VOCAB, MAX_TOKENS, "the shapes3d world")


# ----------------------------------------------------------------------------- scenes


def random_scene(prompt: str, rng: np.random.Generator, tries: int = 100, restarts: int = 50) -> Scene:
    """A scene of ``prompt``'s objects at random places within :data:`PLACE_RADIUS`, centres at
    least :data:`MIN_DISTANCE` apart: each object is placed in turn by rejection sampling, and
    placement starts over when one finds no room (the rng keeps it deterministic)."""
    kinds = kinds_of(prompt)
    for _ in range(restarts):
        objs: list[Primitive] = []
        for color, shape in kinds:
            for _ in range(tries):
                rho, phi = PLACE_RADIUS * math.sqrt(rng.uniform()), rng.uniform(0, 2 * math.pi)
                x, y = rho * math.cos(phi), rho * math.sin(phi)
                if all(math.hypot(x - o.x, y - o.y) >= MIN_DISTANCE for o in objs):
                    r = RADIUS[shape] * (1.0 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))
                    objs.append(Primitive(shape, color, x, y, r))
                    break
            else:
                break
        if len(objs) == len(kinds):
            order = rng.permutation(len(objs))  # neither placement order nor Gaussian order means anything
            return Scene(tuple(objs[i] for i in order))
    raise RuntimeError(f"could not place the objects of {prompt!r}")


def random_camera(generator: np.random.Generator | torch.Generator | None = None) -> Camera:
    """A view of the world: azimuth uniform in [0, 360), elevation uniform in :data:`ELEVATION`."""
    if isinstance(generator, torch.Generator) or generator is None:
        u = torch.rand(2, generator=generator).tolist()
    else:
        u = generator.uniform(size=2).tolist()
    return Camera(360.0 * u[0], ELEVATION[0] + (ELEVATION[1] - ELEVATION[0]) * u[1])


# ----------------------------------------------------------------------------- primitives as Gaussians


def _fibonacci(n: int) -> np.ndarray:
    """``n`` nearly even directions on the unit sphere [n, 3]."""
    i = np.arange(n) + 0.5
    z = 1 - 2 * i / n
    phi = math.pi * (3 - math.sqrt(5)) * i
    rho = np.sqrt(1 - z * z)
    return np.stack([rho * np.cos(phi), rho * np.sin(phi), z], -1)


def _sphere(r: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Surface points, their normals and the Gaussians' std of a sphere resting on z = 0."""
    n = _fibonacci(56)
    s = 0.2 * r
    return n * (r - 0.5 * s) + [0.0, 0.0, r], n, s


def _cube(h: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Points on the five visible faces (not the bottom) of an axis-aligned cube of half-side h."""
    k = 4
    g = (np.arange(k) + 0.5) / k * 2 - 1  # face grid in [-1, 1]
    u, v = (a.reshape(-1) for a in np.meshgrid(g, g))
    s = 0.55 * h * 2 / k
    inset = h - 0.5 * s
    pts, normals = [], []
    for axis in range(3):
        for sign in (1.0, -1.0):
            if axis == 2 and sign < 0:
                continue  # the bottom face lies on the ground
            p = np.zeros((k * k, 3))
            p[:, axis] = sign * inset
            others = [a for a in range(3) if a != axis]
            p[:, others[0]], p[:, others[1]] = u * inset, v * inset
            nrm = np.zeros((k * k, 3))
            nrm[:, axis] = sign
            pts.append(p)
            normals.append(nrm)
    return np.concatenate(pts) + [0.0, 0.0, h], np.concatenate(normals), s


def _cone(r: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Points on the lateral surface of an upright cone of base radius r and height 2 r."""
    height, s = 2.0 * r, 0.2 * r
    pts, normals = [], []
    for i, f in enumerate(np.linspace(0.04, 0.92, 7)):  # share of the height
        ring = (r - 0.5 * s) * (1 - f)
        m = max(3, int(round(2 * math.pi * ring / (2.0 * s))))
        phi = np.arange(m) * 2 * math.pi / m + 0.5 * i
        pts.append(np.stack([ring * np.cos(phi), ring * np.sin(phi), np.full(m, f * height)], -1))
        nrm = np.stack([height * np.cos(phi), height * np.sin(phi), np.full(m, r)], -1)
        normals.append(nrm / np.linalg.norm(nrm, axis=-1, keepdims=True))
    return np.concatenate(pts), np.concatenate(normals), s


_PRIMITIVES = {0: _sphere, 1: _cube, 2: _cone}


def primitive_gaussians(obj: Primitive) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One object's Gaussians: means [n, 3], isotropic stds [n] and shaded colours [n, 3]."""
    pts, normals, s = _PRIMITIVES[obj.shape](obj.radius)
    shade = AMBIENT + (1 - AMBIENT) * np.clip(normals @ LIGHT, 0.0, None)
    colors = COLOR_RGB[obj.color][None] * shade[:, None]
    return pts + [obj.x, obj.y, 0.0], np.full(len(pts), s), colors


def scene_to_gaussians(scene: Scene) -> Gaussians:
    """Every object of ``scene`` as one set of Gaussians (about 50 to 80 an object)."""
    parts = [primitive_gaussians(o) for o in scene.objects]
    means, stds, colors = (torch.from_numpy(np.concatenate(p)).float() for p in zip(*parts))
    return Gaussians.from_tensors(means, stds, colors, torch.full((len(means),), OPACITY))


# ----------------------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=4096)
def _ground(camera: Camera, size: int, supersample: int = 3) -> torch.Tensor:
    k = size * supersample
    o, d = camera.ray_origins(k, torch.float64), camera.ray_directions(k, torch.float64)
    t = -o[:, 2] / d[:, 2].clamp(max=-1e-9)
    hit = o[:, :2] + t[:, None] * d[:, :2]
    on = (d[:, 2] < 0) & (hit.norm(dim=-1) <= GROUND_RADIUS)
    img = torch.where(on[:, None], torch.tensor(GROUND_RGB, dtype=torch.float64), torch.tensor(SKY_RGB, dtype=torch.float64))
    img = img.T.reshape(3, size, supersample, size, supersample).mean((2, 4))  # box-filtered, anti-aliased
    return img.float()


def ground(camera: Camera, size: int = SIZE) -> torch.Tensor:
    """The background of a view, RGB [3, size, size] in [0, 1]: the ground disc of radius
    :data:`GROUND_RADIUS` in :data:`GROUND_RGB`, and sky elsewhere (the renderer's ``background``)."""
    return _ground(camera, size).clone()


def render_scene(scene: Scene, cameras: list[Camera], size: int = SIZE) -> torch.Tensor:
    """Views of one scene over the ground, [V, 3, size, size] in [-1, 1]."""
    with torch.no_grad():
        return render_views(scene_to_gaussians(scene), cameras, size, background=ground).clamp(-1, 1)


def sample_prompts(n: int, rng: np.random.Generator, prompts: list[str] | None = None) -> list[str]:
    """``n`` prompts from ``prompts`` (the training prompts by default): the number of objects
    uniform over those the pool holds, then a prompt uniform among those with that many (so
    one-object scenes are not drowned by the far more numerous three-object prompts)."""
    pool = prompts or train_prompts()
    by_count: dict[int, list[str]] = {}
    for p in pool:
        by_count.setdefault(len(kinds_of(p)), []).append(p)
    counts = sorted(by_count)
    out = []
    for k in rng.integers(0, len(counts), size=n):
        group = by_count[counts[k]]
        out.append(group[int(rng.integers(0, len(group)))])
    return out


def make_batch(n: int, seed: int, prompts: list[str] | None = None, size: int = SIZE
               ) -> tuple[torch.Tensor, list[str], list[Camera], list[Scene]]:
    """``n`` renders of random scenes from random views.

    Args:
        n: batch size.
        seed: the batch's seed (prompts, scenes and cameras are drawn from it).
        prompts: the prompts to draw from (the training prompts by default; see :func:`sample_prompts`).
        size: image size in pixels.

    Returns:
        images [n, 3, size, size] in [-1, 1], their prompts, cameras and scenes.
    """
    rng = np.random.default_rng(seed)
    chosen = sample_prompts(n, rng, prompts)
    scenes = [random_scene(p, rng) for p in chosen]
    cameras = [random_camera(rng) for _ in range(n)]
    images = torch.cat([render_scene(s, [c], size) for s, c in zip(scenes, cameras)])
    return images, [prompt_of(s) for s in scenes], cameras, scenes


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def object_masks(scene: Scene, camera: Camera, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Where each object shows in a view, from the renderer itself (ground truth for judges).

    Returns bool arrays [K, size, size] for the K objects: ``visible`` (the object owns most of
    the pixel's colour in the scene's render) and ``alone`` (its coverage exceeds one half when
    rendered by itself): ``visible.sum() / alone.sum()`` is the share of an object left unoccluded.
    """
    parts = [primitive_gaussians(o) for o in scene.objects]
    k = len(parts)
    means, stds = (torch.from_numpy(np.concatenate(p)).float() for p in list(zip(*parts))[:2])
    ids = torch.cat([torch.eye(k)[i].expand(len(p[0]), k) for i, p in enumerate(parts)])  # one-hot owner
    opac = torch.full((len(means),), OPACITY)
    with torch.no_grad():
        own = _channels(Gaussians.from_tensors(means, stds, torch.zeros(len(means), 3), opac), ids, camera, size)
        alone = [_channels(Gaussians.from_tensors(torch.from_numpy(p[0]).float(), torch.from_numpy(p[1]).float(),
                                                  torch.zeros(len(p[0]), 3), torch.full((len(p[0]),), OPACITY)),
                           torch.ones(len(p[0]), 1), camera, size)[0] for p in parts]
    return (own > 0.5).numpy(), (torch.stack(alone) > 0.5).numpy()


def _channels(g: Gaussians, values: torch.Tensor, camera: Camera, size: int) -> torch.Tensor:
    """The compositing weights summed per channel of ``values`` [N, K]: [K, size, size]."""
    from rewardiff.render.splat import rasterize

    out = []
    for i in range(0, values.shape[1], 3):  # the renderer composites three channels at a time
        chunk = values[:, i:i + 3]
        pad = torch.cat([chunk, torch.zeros(len(chunk), 3 - chunk.shape[1])], 1)
        g.color_logits.data = torch.logit(pad.clamp(1e-7, 1 - 1e-7))
        out.append(rasterize(g, [camera], size, background=(0.0, 0.0, 0.0))[0][0, :chunk.shape[1]])
    return torch.cat(out)

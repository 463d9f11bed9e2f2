"""The OOD sets of MM_Robustness (Qiu et al., "Benchmarking robustness of multimodal image-text models
under distribution shift", 2022; github.com/Jielin-Qiu/MM_Robustness), the sets ELIP (heliossun/ELIP)
evaluates on, made by the libraries MM_Robustness uses: `imagecorruptions` (Michaelis et al. 2019,
the 15 ImageNet-C corruptions plus its 4 validation ones, severities 1-5) and `nlpaug`'s character-
and word-level augmenters. Install them with the `ood` extra: pip install -e '.[ood]'.

- Images: `imagecorruptions.corrupt` on the decoded uint8 image at its own resolution (as
  MM_Robustness applies it to the COCO/Flickr originals), except pixelate, which MM_Robustness
  does on the 224-px square: down to int(224·c)² with cv2's INTER_AREA, back to the image's size.
  (MM_Robustness passes (h, w) where cv2 wants (w, h); we give the image its own size back.)
  Where MM_Robustness's own copies of the ImageNet-C code (image_perturbation/perturb_COCO_IP.py,
  perturb_Flickr30K_IP.py) differ from the library we keep the library's: its glass blur shuffles
  pixels only in the top-left 224 x 224 window (the library: the whole image); its zoom blur at
  severity 5 averages 12 zooms up to 1.33 (np.arange(1, 1.33, 0.03)), the library's 11 up to 1.30;
  its frost overlays the frost picture's top-left h x w corner unscaled (the library scales the
  picture 1.1x past the image and crops it at a random offset). Its snow and frost keep the image's
  size, as the library's do: the scripts call `snow` and `frost`, not the `snow_224` / `frost_224`
  copies beside them that crop to 224 px. And it writes every corrupted image as a JPEG
  (cv2.imwrite, quality 95), so each set also carries that compression; here the corrupted pixels
  go to the model as they are.
- Text: nlpaug at MM_Robustness's rate 0.05·severity: the share of words augmented for the
  character-level augmenters (aug_word_p; nlpaug's default 30 % of a chosen word's characters),
  the share of words for the word-level ones (aug_p), the punctuation ratio for
  insert_punctuation (MM_Robustness's own function: it is not in nlpaug; written out below).
- Seeds: both libraries draw from the global `random` and `numpy.random` states; each call seeds
  them from its own 63-bit seed (mix_seed) and gives the caller's states back afterwards.

LEFT_OUT names MM_Robustness's perturbations that need downloaded models or word lists: nothing
downloads at run time in this project.

imagecorruptions 1.1.2 (its last release) calls three names newer libraries removed:
skimage.filters.gaussian(multichannel=), numpy's np.float_ and pkg_resources.resource_filename,
and its impulse noise draws from an unseeded generator. _load_imagecorruptions() gives its module
those names back and a seeded impulse noise, scoped to that module (no global patch).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.resources
import importlib.util
import random
import sys
import types
import warnings
import zlib
from typing import Iterator

import numpy as np

IMAGE_CORRUPTIONS = (  # imagecorruptions' corruption_tuple order: 15 ImageNet-C, then its 4 extra
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
    "speckle_noise", "gaussian_blur", "spatter", "saturate")
TEXT_PERTURBATIONS = ("keyboard", "ocr", "char_insert", "char_substitute", "char_swap", "char_delete",
                      "word_swap", "word_delete", "insert_punctuation")
CORRUPTIONS = IMAGE_CORRUPTIONS + TEXT_PERTURBATIONS
TEXT_RATE = 0.05  # MM_Robustness: rate 0.05 per severity step, for every text perturbation it runs
PIXELATE_SIDE = 224  # MM_Robustness pixelates on the 224-px square
PIXELATE = [0.6, 0.5, 0.4, 0.3, 0.25]  # its (ImageNet-C's) factors, severity 1..5
PUNCTUATIONS = [".", ",", "!", "?", ";", ":"]  # MM_Robustness's insert_punctuation_marks

# ELIP's reported OOD evaluation beyond clean (heliossun/ELIP rebuttal.md, "following MM_Robustness",
# each the mean over severities 1-5): images zoom blur, snow, JPEG; text keyboard, synonym
# replacement and formal style. The last two are in LEFT_OUT (WordNet; a style-transfer model).
PRESETS = {"full": CORRUPTIONS, "elip": ("zoom_blur", "snow", "jpeg_compression", "keyboard")}

LEFT_OUT = {
    "synonym_replacement (sr)": "EDA's WordNet synonyms: needs nltk's WordNet download",
    "word_insertion (ri)": "EDA inserts WordNet synonyms: needs nltk's WordNet download",
    "back_translation": "facebook/wmt19-en-de and -de-en translation models",
    "formal / casual / passive / active": "Styleformer's T5 style-transfer models",
    "stylize (images)": "an AdaIN style-transfer network and painting images",
    "similarity filter": "MM_Robustness re-draws a text perturbation until a sentence-transformers model "
                         "(paraphrase-mpnet-base-v2) scores it >= 0.9 against the original",
}


class MissingExtra(ImportError):
    """The OOD libraries are not installed."""


def mix_seed(seed: int, name: str, severity: int, index: int) -> int:
    """One 63-bit seed per (run seed, corruption, severity, item): crc32, not hash(), because str
    hashes change from process to process (and between DataLoader workers)."""
    state = np.random.SeedSequence([seed, zlib.crc32(name.encode()), severity, index]).generate_state(2)
    return int(state[0]) << 31 ^ int(state[1])


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """The global `random` and `numpy.random` states seeded from `seed`, the caller's back after."""
    py, npy = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)


def _need(module: str) -> types.ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtra(f"the OOD sets need {module.split('.')[0]!r} ({e}); install the extra: "
                           "pip install -e '.[ood]'") from e


class _Proxy(types.ModuleType):
    """A module's names, some of them replaced: imagecorruptions' view of numpy and scikit-image."""

    def __init__(self, module: types.ModuleType, **names):
        super().__init__(module.__name__)
        self.__dict__.update(names)
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)


def _seeded_random_noise(random_noise):
    """skimage's random_noise draws from a fresh generator unless given one (impulse_noise does
    not): give it one seeded from numpy's global state, which seeded() has set."""
    def noise(image, *args, rng=None, **kwargs):
        return random_noise(image, *args, rng=np.random.randint(2 ** 31) if rng is None else rng, **kwargs)
    return noise


_IC = None


def _load_imagecorruptions():
    """imagecorruptions' package, its corruptions module given the three removed names back."""
    global _IC
    if _IC is None:
        if "pkg_resources" not in sys.modules and importlib.util.find_spec("pkg_resources") is None:
            shim = types.ModuleType("pkg_resources")  # setuptools >= 81 has none; frost needs one call
            shim.resource_filename = lambda package, name: str(
                importlib.resources.files(package.rpartition(".")[0] or package).joinpath(name))
            sys.modules["pkg_resources"] = shim
        skimage, skimage_filters = _need("skimage"), _need("skimage.filters")
        skimage_util = _need("skimage.util")
        with warnings.catch_warnings():  # its scipy.ndimage.interpolation import: deprecated, still there
            warnings.simplefilter("ignore", DeprecationWarning)
            corruptions = _need("imagecorruptions.corruptions")

        def gaussian(image, *args, multichannel=None, **kwargs):  # skimage >= 0.21: channel_axis
            if multichannel:
                kwargs.setdefault("channel_axis", -1)
            return skimage_filters.gaussian(image, *args, **kwargs)

        corruptions.gaussian = gaussian
        corruptions.np = _Proxy(np, float_=np.float64)  # NumPy 2 removed np.float_ (fog)
        corruptions.sk = _Proxy(skimage, util=_Proxy(skimage_util,
                                                     random_noise=_seeded_random_noise(skimage_util.random_noise)))
        _IC = _need("imagecorruptions")
    return _IC


def require(names) -> None:
    """Load the libraries `names` need now: a missing extra fails before any encoding starts."""
    if any(n in IMAGE_CORRUPTIONS and n != "pixelate" for n in names):
        _load_imagecorruptions()
    for n in {n for n in names if n in TEXT_PERTURBATIONS and n != "insert_punctuation"}:
        _augmenter(n, 1)


def _check(name: str, severity: int, names: tuple) -> None:
    if name not in names or not 0 <= severity <= 5:
        raise ValueError(f"unknown corruption {name!r} or severity {severity} (0-5; {', '.join(names)})")


def corrupt(image: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [H, W, 3]: imagecorruptions' `name` at `severity` (0: the input
    itself), pixelate on the 224-px square; its random draws seeded with `seed`."""
    _check(name, severity, IMAGE_CORRUPTIONS)
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"need a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    if severity == 0:
        return image
    if name == "pixelate":
        import cv2
        side = int(PIXELATE_SIDE * PIXELATE[severity - 1])
        small = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_AREA)
    ic = _load_imagecorruptions()
    with seeded(seed):
        return np.ascontiguousarray(ic.corrupt(image, severity=severity, corruption_name=name), dtype=np.uint8)


_AUGMENTERS: dict = {}


def _augmenter(name: str, severity: int):
    key = (name, severity)
    if key not in _AUGMENTERS:
        rate = TEXT_RATE * severity
        if name.startswith("word"):
            naw = _need("nlpaug.augmenter.word")
            _AUGMENTERS[key] = naw.RandomWordAug(action=name[5:], aug_p=rate)
        else:
            nac = _need("nlpaug.augmenter.char")
            if name == "keyboard":
                _AUGMENTERS[key] = nac.KeyboardAug(aug_word_p=rate)
            elif name == "ocr":
                _AUGMENTERS[key] = nac.OcrAug(aug_word_p=rate)
            else:
                _AUGMENTERS[key] = nac.RandomCharAug(action=name[5:], aug_word_p=rate)
    return _AUGMENTERS[key]


def insert_punctuation(text: str, ratio: float, rng: random.Random) -> str:
    """MM_Robustness's insert_punctuation_marks: q ~ U{1 .. int(ratio·words + 1)} distinct words
    each get a random mark from PUNCTUATIONS in front of them."""
    words = text.split(" ")
    q = rng.randint(1, int(ratio * len(words) + 1))
    marked = set(rng.sample(range(len(words)), min(q, len(words))))
    return " ".join(f"{rng.choice(PUNCTUATIONS)} {w}" if i in marked else w for i, w in enumerate(words))


def perturb_text(text: str, name: str, severity: int, seed: int = 0) -> str:
    """`text` with nlpaug's perturbation `name` (TEXT_PERTURBATIONS) at `severity` 0-5, its draws
    seeded with `seed`; the input when the augmenter returns nothing (as MM_Robustness keeps it)."""
    _check(name, severity, TEXT_PERTURBATIONS)
    if severity == 0 or not text.strip():
        return text
    if name == "insert_punctuation":
        return insert_punctuation(text, TEXT_RATE * severity, random.Random(seed))
    augmenter = _augmenter(name, severity)
    with seeded(seed):
        out = augmenter.augment(text)
    out = out[0] if isinstance(out, list) and out else out  # nlpaug >= 1.1.11 returns a list
    return out or text

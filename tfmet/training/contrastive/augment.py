"""Training augmentation of the Met contrastive recipe, on the TF graph (inside tf.data).

The reference (torchvision) applies, to each image of a pair independently:

    RandomResizedCrop(imsize, scale=(0.7, 1.0), ratio=(0.99, 1/0.99))
    RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)
    RandomGrayscale(p=0.2)

`Augmenter` reproduces those distributions with **stateless** random draws from a per-image seed,
so a pair's augmentation depends only on (run seed, epoch, pair position, side): parallel
`Dataset.map` is deterministic and a resumed run sees the same images. The pixel operations are
keras-cv layers (`RandomColorDegeneration` for saturation, `RandomHue`, `Grayscale`) applied
through their `augment_images(images, transformations)` with the drawn parameters; the rest is
plain TF where keras-cv's semantics differ from torchvision's:

- crop: torchvision's rule (10 attempts of area in `scale` x image area and log-uniform aspect
  ratio, accepted if it fits, else a central crop with the ratio clamped), then a bilinear
  antialiased resize to imsize x imsize. keras-cv's `RandomCropAndResize` clips its box instead
  of retrying and resamples without antialiasing, which gives a different crop distribution.
- brightness: torchvision multiplies by b ~ U[1 - 0.4, 1 + 0.4]; keras-cv's `RandomBrightness`
  adds an offset.
- contrast: torchvision blends with the mean of the grayscale image; keras-cv's `RandomContrast`
  uses per-channel means.
- the four jitter operations run in a random order, as torchvision's ColorJitter.

Images are float32 RGB in [0, 255] in and out. torchvision works on uint8 PIL images and rounds
after every operation; here nothing is rounded.
"""

import math

import tensorflow as tf

from tfmet.training.contrastive.config import AugmentConfig


def _uniform(seed, shape=(), low=0.0, high=1.0):
    return tf.random.stateless_uniform(shape, seed=seed, minval=low, maxval=high)


def random_resized_crop_box(
    height, width, seed, scale=(0.7, 1.0), ratio=(0.99, 1 / 0.99), attempts=10
):
    """torchvision's RandomResizedCrop.get_params, statelessly: (top, left, crop_h, crop_w).

    Each attempt draws an area in `scale` x height x width and a log-uniform aspect ratio in
    `ratio`, rounds w = sqrt(area * r), h = sqrt(area / r) and is accepted if the crop fits; the
    offsets are uniform integers. If no attempt fits: a central crop of the whole image with its
    aspect ratio clamped to `ratio`.
    """
    height = tf.cast(height, tf.int32)
    width = tf.cast(width, tf.int32)
    seeds = tf.random.experimental.stateless_split(seed, 4)
    area = tf.cast(height * width, tf.float32)
    target_area = area * _uniform(seeds[0], [attempts], scale[0], scale[1])
    log_ratio = _uniform(seeds[1], [attempts], math.log(ratio[0]), math.log(ratio[1]))
    aspect = tf.exp(log_ratio)
    # Python's round() (half to even) as torchvision uses; tf.round is half to even too.
    crop_w = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
    crop_h = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    any_fits = tf.reduce_any(fits)

    def attempt():
        h, w = crop_h[first], crop_w[first]
        u = _uniform(seeds[2], [2])
        top = tf.minimum(tf.cast(u[0] * tf.cast(height - h + 1, tf.float32), tf.int32), height - h)
        left = tf.minimum(tf.cast(u[1] * tf.cast(width - w + 1, tf.float32), tf.int32), width - w)
        return top, left, h, w

    return tf.cond(any_fits, attempt, lambda: central_crop_box(height, width, ratio))


def central_crop_box(height, width, ratio=(0.99, 1 / 0.99)):
    """torchvision's fallback crop: the whole image with its aspect ratio clamped to `ratio`."""
    height = tf.cast(height, tf.int32)
    width = tf.cast(width, tf.int32)
    in_ratio = tf.cast(width, tf.float32) / tf.cast(height, tf.float32)
    narrow_h = tf.cast(tf.round(tf.cast(width, tf.float32) / ratio[0]), tf.int32)
    wide_w = tf.cast(tf.round(tf.cast(height, tf.float32) * ratio[1]), tf.int32)
    h = tf.where(in_ratio < ratio[0], tf.minimum(narrow_h, height), height)
    w = tf.where(in_ratio > ratio[1], tf.minimum(wide_w, width), width)
    return (height - h) // 2, (width - w) // 2, h, w


def crop_and_resize(image, top, left, crop_h, crop_w, size):
    """`image[top:top+crop_h, left:left+crop_w]` resized (bilinear, antialiased) to size x size."""
    crop = image[top : top + crop_h, left : left + crop_w]
    resized = tf.image.resize(crop, [size, size], method="bilinear", antialias=True)
    return tf.clip_by_value(resized, 0.0, 255.0)


def _grayscale_mean(image):
    return tf.reduce_mean(tf.image.rgb_to_grayscale(image))


class Augmenter:
    """Stateless training augmentation: `augmenter(image, seed)` -> [size, size, 3].

    Args:
      config: an `AugmentConfig`.
      augment: False only resizes the central crop (the crop fallback) to size x size, without
        any randomness (for checks on fixed batches).
    """

    def __init__(self, config=None, augment=True):
        import keras_cv  # noqa: PLC0415 (slow import, only needed for training)

        self.config = config or AugmentConfig()
        self.augment = bool(augment)
        self._saturation = keras_cv.layers.RandomColorDegeneration(factor=(0.0, 1.0), seed=0)
        self._hue = keras_cv.layers.RandomHue(factor=(0.0, 1.0), value_range=(0, 255), seed=0)
        self._grayscale = keras_cv.layers.Grayscale(output_channels=3)
        # Traced once per Augmenter, then reused by every epoch's tf.data pipeline.
        self._augment = tf.function(
            self._augment_fn,
            input_signature=[
                tf.TensorSpec([None, None, 3], tf.float32, name="image"),
                tf.TensorSpec([2], tf.int64, name="seed"),
            ],
        )

    # Each jitter operation takes an image batch [1, H, W, 3] and its factor.
    def _brightness(self, images, factor):
        return tf.clip_by_value(images * factor, 0.0, 255.0)

    def _contrast(self, images, factor):
        mean = _grayscale_mean(images)
        return tf.clip_by_value(factor * images + (1.0 - factor) * mean, 0.0, 255.0)

    def _saturation_op(self, images, factor):
        # RandomColorDegeneration blends towards grayscale by its factor: 1 - s keeps s of the
        # colour, i.e. torchvision's adjust_saturation(s).
        return self._saturation.augment_images(images, tf.reshape(1.0 - factor, [1, 1, 1, 1]))

    def _hue_op(self, images, shift):
        return self._hue.augment_images(images, tf.reshape(shift, [1]))

    def color_jitter(self, image, seed):
        """torchvision ColorJitter(brightness, contrast, saturation, hue), random order."""
        c = self.config
        seeds = tf.random.experimental.stateless_split(seed, 2)
        u = _uniform(seeds[0], [4])
        factors = [
            1.0 - c.brightness + 2.0 * c.brightness * u[0],
            1.0 - c.contrast + 2.0 * c.contrast * u[1],
            1.0 - c.saturation + 2.0 * c.saturation * u[2],
            -c.hue + 2.0 * c.hue * u[3],
        ]
        order = tf.argsort(_uniform(seeds[1], [4]))  # a uniform random permutation
        ops = [self._brightness, self._contrast, self._saturation_op, self._hue_op]

        def apply_next(position, images):
            branches = [
                (lambda op=op, f=f: op(images, f)) for op, f in zip(ops, factors, strict=True)
            ]
            return position + 1, tf.switch_case(tf.gather(order, position), branches)

        _, images = tf.while_loop(
            lambda position, _: position < 4, apply_next, [tf.constant(0), image[tf.newaxis]]
        )
        return images[0]

    def grayscale(self, image):
        return self._grayscale.augment_images(image[tf.newaxis])[0]

    def __call__(self, image, seed):
        """Augments one float32 [H, W, 3] image in [0, 255] with a [2] integer seed."""
        image = tf.convert_to_tensor(image, tf.float32)
        return self._augment(image, tf.cast(seed, tf.int64))

    def _augment_fn(self, image, seed):
        c = self.config
        shape = tf.shape(image)
        if not self.augment:
            top, left, h, w = central_crop_box(shape[0], shape[1], c.crop_ratio)
            return crop_and_resize(image, top, left, h, w, int(c.image_size))
        crop_seed, jitter_seed, apply_seed = tf.unstack(
            tf.random.experimental.stateless_split(seed, 3)
        )
        top, left, h, w = random_resized_crop_box(
            shape[0], shape[1], crop_seed, c.crop_scale, c.crop_ratio, int(c.crop_attempts)
        )
        image = crop_and_resize(image, top, left, h, w, int(c.image_size))
        apply = _uniform(apply_seed, [2])
        image = tf.cond(
            apply[0] < c.jitter_prob, lambda: self.color_jitter(image, jitter_seed), lambda: image
        )
        image = tf.cond(apply[1] < c.grayscale_prob, lambda: self.grayscale(image), lambda: image)
        image.set_shape([int(c.image_size), int(c.image_size), 3])
        return image

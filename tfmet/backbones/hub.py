"""TF-Hub image modules as Keras 3 backbones: "hub:<handle or local path>[#options]".

A handle is anything `tensorflow_hub.resolve` accepts: a tfhub.dev / Kaggle URL (downloaded once
into TFHUB_CACHE_DIR, then used offline from there), a URL of a .tar.gz, or a local directory
holding a TF2 SavedModel (reusable-SavedModel API: `__call__(inputs, training=...)`, `variables`,
`trainable_variables`, `regularization_losses`) or a TF1 hub module (use its `signature`).

`HubModule` wraps the object returned by `hub.load` directly as a Keras 3 layer - `hub.KerasLayer`
only works inside tf_keras models. As `keras.layers.TFSMLayer` does, it wraps each loaded
`tf.Variable` in a Keras variable sharing the same storage, so the module's variables are the
layer's weights: they save with `save_weights`, receive gradients and are updated by Keras
optimizers. Which ones train is chosen by regular expressions on the variable names
(`trainable_patterns`, matched with `re.search` against names such as
"resnet_v2_50/block4/unit_3/bottleneck_v2/conv3/weights:0"); variables the module itself lists
as non-trainable (batch-norm statistics) never train.

Options can be given in the backbone name after '#', as `key=value` pairs joined by '&' (values
are taken literally, so a regular expression may contain anything but '&'):

    hub:/models/bit_m_r50x1#output=feature_map&preprocessing=zero_one&trainable=block4
    hub:https://tfhub.dev/google/imagenet/resnet_v1_50/feature_vector/1#signature=image_feature_vector&output=resnet_v1_50/block4

  output         the key of the module's output dict to return (the spatial feature map);
                 required when the module returns a dict.
  signature      call `signatures[<name>]` instead of `__call__` (TF1 hub modules).
  preprocessing  zero_one (default: hub image modules take [0, 1] RGB), minus_one_one,
                 imagenet_torch or imagenet_caffe.
  trainable      a variable-name pattern to make trainable; repeat the key for several.
                 Without it every variable the module marks trainable is trainable.

The same options are keyword arguments of `build` / `tfmet.backbones.get("hub:...", ...)`
(keyword arguments win over name options), and `register_module` gives a module a plain name.
"""

import math
import os
import re
import warnings
from collections.abc import Sequence

import keras
import tensorflow as tf

from tfmet.backbones import family, registry
from tfmet.backbones.weights import load_weights

PREFIX = "hub:"

PREPROCESSING = {
    "zero_one": registry.SCALE_ZERO_ONE,
    "minus_one_one": registry.SCALE_MINUS_ONE_ONE,
    "imagenet_torch": registry.IMAGENET_TORCH,
    "imagenet_caffe": registry.IMAGENET_CAFFE,
}
_NAME_OPTIONS = ("output", "signature", "preprocessing", "trainable")


def _is_remote(handle: str) -> bool:
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", handle) is not None


def _tensorflow_hub():
    """Imports tensorflow_hub on first use (it is slow to import and warns about pkg_resources)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
        import tensorflow_hub

    return tensorflow_hub


def resolve(handle: str) -> str:
    """The local directory of `handle` (downloads into TFHUB_CACHE_DIR if it is a URL).

    Raises:
      FileNotFoundError: a local path that does not exist.
      ValueError: a URL that cannot be resolved (e.g. offline and not in the cache).
    """
    if not _is_remote(handle):
        if not os.path.isdir(handle):
            raise FileNotFoundError(f"Hub module directory not found: {handle}")
        return handle
    try:
        return _tensorflow_hub().resolve(handle)
    except Exception as e:  # noqa: BLE001 - hub raises many kinds; all mean "not resolvable"
        cache = os.environ.get("TFHUB_CACHE_DIR", "<unset>")
        raise ValueError(
            f"Could not resolve hub handle {handle!r} (TFHUB_CACHE_DIR={cache}): {e}. Offline, "
            "put the module into TFHUB_CACHE_DIR or pass its local directory."
        ) from e


def _load(handle: str):
    path = resolve(handle)
    try:
        return _tensorflow_hub().load(path)
    except (OSError, ValueError, tf.errors.OpError) as e:
        raise ValueError(f"Could not load hub module {handle!r} from {path}: {e}") from e


def _concrete_functions(fn) -> list:
    if hasattr(fn, "structured_outputs"):  # already a ConcreteFunction (signatures)
        return [fn]
    concrete = getattr(fn, "concrete_functions", None)
    if concrete is None:
        try:
            concrete = fn._list_all_concrete_functions_for_serialization()
        except AttributeError:
            concrete = []
    return list(concrete)


def _function_variables(fn) -> tuple[list, list]:
    """(all, trainable) variables captured by the traced functions of `fn`."""
    variables, trainable = [], []
    for concrete in _concrete_functions(fn):
        variables.extend(concrete.variables)
        trainable.extend(concrete.trainable_variables)
    return variables, trainable


@keras.saving.register_keras_serializable(package="tfmet")
class HubModule(keras.layers.Layer):
    """A TF-Hub module (TF2 SavedModel or TF1 hub format) as a Keras 3 layer.

    Args:
      handle: hub handle or local module directory.
      output_key: key of the module's output dict to return; required when it returns a dict.
      signature: call `signatures[signature]` (TF1 hub modules) instead of `__call__`.
      trainable_patterns: regular expressions; a variable the module marks trainable trains
        when its name matches one (`re.search`). None: all of them train; []: none.
      arguments: extra keyword arguments for every call of the module.
      **kwargs: base Layer arguments (name, trainable, dtype).
    """

    def __init__(
        self,
        handle,
        output_key=None,
        signature=None,
        trainable_patterns=None,
        arguments=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.handle = handle
        self.output_key = output_key
        self.signature = signature
        self.trainable_patterns = None if trainable_patterns is None else list(trainable_patterns)
        self.arguments = dict(arguments or {})
        self._compiled_patterns = None
        if self.trainable_patterns is not None:
            try:
                self._compiled_patterns = [re.compile(p) for p in self.trainable_patterns]
            except re.error as e:
                raise ValueError(
                    f"Invalid regular expression in trainable_patterns: {e}. "
                    f"Received: trainable_patterns={self.trainable_patterns}"
                ) from e

        self._module = _load(handle)
        if signature is not None:
            available = sorted(getattr(self._module, "signatures", {}) or {})
            if signature not in available:
                raise ValueError(
                    f"Hub module {handle!r} has no signature {signature!r}. "
                    f"Available signatures: {available}"
                )
            self._fn = self._module.signatures[signature]
            self._accepts_training = False
            module_variables, module_trainable = _function_variables(self._fn)
        else:
            if not callable(self._module):
                available = sorted(getattr(self._module, "signatures", {}) or {})
                raise ValueError(
                    f"Hub module {handle!r} is not callable (TF1 hub format?); pass one of its "
                    f"signatures with signature=... Available signatures: {available}"
                )
            self._fn = self._module.__call__
            self._accepts_training = self._takes_training(self._fn)
            if hasattr(self._module, "variables"):
                module_variables = list(self._module.variables)
                module_trainable = list(getattr(self._module, "trainable_variables", []))
            else:  # a plain SavedModel: the variables its traced functions use
                module_variables, module_trainable = _function_variables(self._fn)
        self._check_output_key([c.structured_outputs for c in _concrete_functions(self._fn)])

        trainable_ids = {id(v) for v in module_trainable}
        self._variable_names = {}
        seen = set()
        for variable in module_variables:
            if id(variable) in seen:
                continue
            seen.add(id(variable))
            wrapped = keras.Variable(
                initializer=variable,
                trainable=id(variable) in trainable_ids,
                dtype=variable.dtype,
                shape=variable.shape,
                name=variable.name.split(":")[0].replace("/", "_"),
            )
            self._variable_names[id(wrapped)] = variable.name
            self._track_variable(wrapped)
        self._regularization_losses = list(getattr(self._module, "regularization_losses", []))
        self._apply_trainable_patterns()
        self._build_at_init()

    @staticmethod
    def _takes_training(fn) -> bool:
        try:
            spec = fn.function_spec.fullargspec  # restored tf.function
            return "training" in spec.args or "training" in spec.kwonlyargs
        except AttributeError:
            return True

    def _check_output_key(self, structures) -> None:
        dicts = [s for s in structures if isinstance(s, dict)]
        if not dicts:
            if self.output_key is not None and structures:
                raise ValueError(
                    f"Hub module {self.handle!r} returns a single tensor, not a dict; "
                    f"output_key must be None. Received: output_key={self.output_key!r}"
                )
            return
        available = sorted(dicts[0])
        if self.output_key is None:
            raise ValueError(
                f"Hub module {self.handle!r} returns a dict; choose the output with output_key "
                f"(option 'output'). Available outputs: {available}"
            )
        if self.output_key not in available:
            raise ValueError(
                f"Hub module {self.handle!r} has no output {self.output_key!r}. "
                f"Available outputs: {available}"
            )

    def variable_name(self, variable) -> str:
        """The module's own name of one of this layer's variables (e.g. "block4/conv/kernel:0")."""
        return self._variable_names.get(id(variable), variable.name)

    def _module_trainable_variables(self):
        return list(self._trainable_variables)

    def _apply_trainable_patterns(self) -> None:
        if not self.trainable:
            return
        for variable in self._module_trainable_variables():
            name = self.variable_name(variable)
            variable.trainable = self._compiled_patterns is None or any(
                p.search(name) for p in self._compiled_patterns
            )

    @property
    def trainable(self):
        return keras.layers.Layer.trainable.fget(self)

    @trainable.setter
    def trainable(self, value):
        # Layer.trainable = True marks every variable trainable; keep the pattern selection.
        keras.layers.Layer.trainable.fset(self, value)
        if value and getattr(self, "_variable_names", None) is not None:
            self._apply_trainable_patterns()

    def set_trainable_patterns(self, patterns) -> list[str]:
        """Selects the trainable variables by name pattern; returns the names selected."""
        self.trainable_patterns = None if patterns is None else list(patterns)
        self._compiled_patterns = (
            None if patterns is None else [re.compile(p) for p in self.trainable_patterns]
        )
        self._apply_trainable_patterns()
        return [self.variable_name(v) for v in self.trainable_weights]

    def call(self, inputs, training=None):
        inputs = tf.convert_to_tensor(inputs, tf.float32)
        training = bool(training) and bool(self.trainable_weights)
        if self.signature is not None:
            arg_name = self._signature_input_name()
            outputs = self._fn(**{arg_name: inputs}, **self.arguments)
        elif self._accepts_training:
            outputs = self._fn(inputs, training=training, **self.arguments)
        else:
            outputs = self._fn(inputs, **self.arguments)
        if isinstance(outputs, dict):
            if self.output_key not in outputs:
                raise ValueError(
                    f"Hub module {self.handle!r} has no output {self.output_key!r}. "
                    f"Available outputs: {sorted(outputs)}"
                )
            outputs = outputs[self.output_key]
        if training and self._regularization_losses:
            self.add_loss(tf.add_n([fn() for fn in self._regularization_losses]))
        return outputs

    def _signature_input_name(self) -> str:
        names = list(self._fn.structured_input_signature[1])
        if len(names) != 1:
            raise ValueError(
                f"Hub module {self.handle!r} signature {self.signature!r} takes inputs {names}; "
                "only single-input image signatures are supported."
            )
        return names[0]

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "handle": self.handle,
                "output_key": self.output_key,
                "signature": self.signature,
                "trainable_patterns": self.trainable_patterns,
                "arguments": self.arguments,
            }
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None, safe_mode=None):
        """Reloads the module from its handle; refused in safe mode (like TFSMLayer).

        A SavedModel is a program: loading one from a config is only allowed with
        `safe_mode=False` or `keras.config.enable_unsafe_deserialization()`.
        """
        del custom_objects
        effective = safe_mode
        if effective is None:
            effective = keras.src.saving.serialization_lib.in_safe_mode()
        if effective is not False:
            raise ValueError(
                f"Refusing to load hub module {config.get('handle')!r} from a config in safe "
                "mode (a SavedModel can run arbitrary graph code). Pass safe_mode=False or call "
                "keras.config.enable_unsafe_deserialization() if you trust it."
            )
        return cls(**config)


def parse_name(name: str) -> tuple[str, dict]:
    """Splits "hub:<handle>[#k=v&k=v]" into the handle and the options dict.

    `trainable` may repeat and is returned as a list under "trainable".
    """
    if not name.startswith(PREFIX):
        raise ValueError(f"Hub backbone names start with {PREFIX!r}. Received: name={name!r}")
    handle, _, option_text = name[len(PREFIX) :].partition("#")
    if not handle:
        raise ValueError(f"Empty hub handle. Received: name={name!r}")
    options: dict = {}
    for item in filter(None, option_text.split("&")):
        key, sep, value = item.partition("=")
        if not sep or key not in _NAME_OPTIONS:
            raise ValueError(
                f"Bad hub option {item!r} in {name!r}; expected key=value with key in "
                f"{list(_NAME_OPTIONS)}."
            )
        if key == "trainable":
            options.setdefault("trainable", []).append(value)
        else:
            options[key] = value
    return handle, options


def _preprocessing(key: str) -> registry.Preprocessing:
    if key not in PREPROCESSING:
        raise ValueError(
            f"Unknown hub preprocessing {key!r}; valid: {sorted(PREPROCESSING)}. "
            f"Received: preprocessing={key!r}"
        )
    return PREPROCESSING[key]


def build(
    handle: str,
    weights=None,
    output_key=None,
    signature=None,
    trainable_patterns=None,
    arguments=None,
    name=None,
) -> keras.Model:
    """A Keras model images [B, H, W, 3] -> the module's output (see `HubModule`).

    `weights` is None (the module's own weights) or a `.weights.h5` file saved from a model
    built the same way (e.g. after fine-tuning).
    """
    images = keras.Input((None, None, 3), name="images")
    layer = HubModule(
        handle,
        output_key=output_key,
        signature=signature,
        trainable_patterns=trainable_patterns,
        arguments=arguments,
        name="hub_module",
    )
    model = keras.Model(images, layer(images), name=name or "hub")
    if weights is not None:
        load_weights(model, weights)
    return model


def hub_layer(model: keras.Model) -> HubModule:
    """The `HubModule` inside a model built by `build`."""
    for layer in model.layers:
        if isinstance(layer, HubModule):
            return layer
    raise ValueError(f"Model {model.name!r} contains no HubModule layer.")


_BLOCK_UNIT = re.compile(r"(block(\d+)/unit_(\d+))")
# Variable names of BatchNorm parameters and statistics in TF-Slim / TF2 modules.
_BN_NAME = re.compile(
    r"(batch_?norm|/bn\d*/|/bn\d*$|_bn$|_bn_|\.bn\d*$|gamma|beta|moving_)", re.IGNORECASE
)


class HubFamily(family.Family):
    """TF-Hub modules: variables are chosen by regular expressions on their names
    (`trainable_patterns`); `trainable_blocks` counts the "blockB/unit_U" groups of the names
    (TF-Slim ResNets); `trainable_fraction` the variables the module lets train, in order. A
    SavedModel runs in the dtype it was saved with: no reduced precision."""

    name = "hub"
    reduced_precision = False
    variable_patterns = True

    def matches(self, model):
        layers = getattr(model, "_flatten_layers", None)
        return layers is not None and any(
            isinstance(layer, HubModule) for layer in layers(include_self=True, recursive=True)
        )

    def blocks(self, model):
        layer = hub_layer(model)
        found = {}
        for variable in layer.weights:
            match = _BLOCK_UNIT.search(layer.variable_name(variable))
            if match:
                found[match.group(1)] = (int(match.group(2)), int(match.group(3)))
        return sorted(found, key=found.get, reverse=True)

    def train_top(self, model, blocks, fraction, patterns, batchnorm, name):
        """Returns the names of the variables that train. A hub module receives one `training`
        flag, so with batchnorm="train" all its BatchNorms use batch statistics."""
        layer = hub_layer(model)
        model.trainable = True
        layer.trainable = True
        if blocks:
            if not self.blocks(model):
                raise ValueError(
                    f"trainable_blocks: the variables of hub module {name!r} show no "
                    "block/unit structure; use trainable_patterns"
                )
            chosen = self.top_blocks(model, blocks, name)
            patterns = [re.escape(block) + "/" for block in chosen]
        elif fraction:
            names = layer.set_trainable_patterns(None)  # every variable the module lets train
            if batchnorm == "frozen":
                names = [n for n in names if not _BN_NAME.search(n)]
            count = math.ceil(fraction * len(names))
            patterns = ["^" + re.escape(n) + "$" for n in names[len(names) - count :]]
        selected = layer.set_trainable_patterns(list(patterns))
        if batchnorm == "frozen":
            keep = [n for n in selected if not _BN_NAME.search(n)]
            if len(keep) != len(selected):
                selected = layer.set_trainable_patterns(["^" + re.escape(n) + "$" for n in keep])
        if not selected:
            model.trainable = False
        return selected


FAMILY = registry.register_family(HubFamily())


def _spec(
    name: str,
    handle: str,
    output_key=None,
    signature=None,
    preprocessing: registry.Preprocessing = registry.SCALE_ZERO_ONE,
    trainable_patterns: Sequence[str] | None = None,
    description: str = "",
) -> registry.BackboneSpec:
    defaults = {
        "output_key": output_key,
        "signature": signature,
        "trainable_patterns": trainable_patterns,
    }

    def builder(weights=None, **kwargs):
        unknown = set(kwargs) - {"output_key", "signature", "trainable_patterns", "arguments"}
        if unknown:
            raise TypeError(f"Unknown hub backbone arguments: {sorted(unknown)}")
        return build(handle, weights=weights, name="hub", **{**defaults, **kwargs})

    return registry.BackboneSpec(
        name=name,
        builder=builder,
        preprocessing=preprocessing,
        description=description or f"TF-Hub module {handle}",
        family=FAMILY,
    )


def resolve_name(name: str) -> registry.BackboneSpec:
    """The registry resolver for "hub:..." names."""
    handle, options = parse_name(name)
    return _spec(
        name,
        handle,
        output_key=options.get("output"),
        signature=options.get("signature"),
        preprocessing=_preprocessing(options.get("preprocessing", "zero_one")),
        trainable_patterns=options.get("trainable"),
    )


def register_module(
    name: str,
    handle: str,
    output_key=None,
    signature=None,
    preprocessing: str = "zero_one",
    trainable_patterns: Sequence[str] | None = None,
    description: str = "",
) -> registry.BackboneSpec:
    """Registers hub module `handle` under the plain backbone name `name`."""
    return registry.register(
        _spec(
            name,
            handle,
            output_key=output_key,
            signature=signature,
            preprocessing=_preprocessing(preprocessing),
            trainable_patterns=trainable_patterns,
            description=description,
        )
    )


registry.register_prefix(PREFIX, resolve_name)

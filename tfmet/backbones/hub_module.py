"""A TF-Hub module (TF2 SavedModel or TF1 hub format) as a Keras 3 layer: `HubModule`.

`hub.KerasLayer` only works inside tf_keras models, so `HubModule` wraps the object returned by
`tensorflow_hub.load` directly. As `keras.layers.TFSMLayer` does, it wraps each loaded
`tf.Variable` in a Keras variable sharing the same storage, so the module's variables are the
layer's weights: they save with `save_weights`, receive gradients and are updated by Keras
optimizers. Which ones train is chosen by regular expressions on the variable names
(`trainable_patterns`, matched with `re.search` against names such as
"resnet_v2_50/block4/unit_3/bottleneck_v2/conv3/weights:0"); variables the module itself lists
as non-trainable (batch-norm statistics) never train.

Handles are resolved by `resolve` (a local directory, or a URL downloaded into TFHUB_CACHE_DIR).
The backbone names "hub:..." that build such a layer are `tfmet.backbones.hub`'s.
"""

import os
import re
import warnings

import keras
import tensorflow as tf


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


def _compile_patterns(patterns):
    """`trainable_patterns` compiled (None stays None); ValueError naming a bad expression."""
    if patterns is None:
        return None
    try:
        return [re.compile(p) for p in patterns]
    except re.error as e:
        raise ValueError(
            f"Invalid regular expression in trainable_patterns: {e}. "
            f"Received: trainable_patterns={patterns}"
        ) from e


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
        self._compiled_patterns = _compile_patterns(self.trainable_patterns)
        self._module = _load(handle)
        module_variables, module_trainable = self._bind_function()
        self._check_output_key([c.structured_outputs for c in _concrete_functions(self._fn)])
        self._variable_names = {}
        self._wrap_variables(module_variables, {id(v) for v in module_trainable})
        self._regularization_losses = list(getattr(self._module, "regularization_losses", []))
        self._apply_trainable_patterns()
        self._build_at_init()

    def _bind_function(self) -> tuple[list, list]:
        """Chooses the function calls run (`signatures[signature]`, else `__call__`); returns the
        module's (all, trainable) variables."""
        available = sorted(getattr(self._module, "signatures", {}) or {})
        if self.signature is not None:
            if self.signature not in available:
                raise ValueError(
                    f"Hub module {self.handle!r} has no signature {self.signature!r}. "
                    f"Available signatures: {available}"
                )
            self._fn = self._module.signatures[self.signature]
            self._accepts_training = False
            return _function_variables(self._fn)
        if not callable(self._module):
            raise ValueError(
                f"Hub module {self.handle!r} is not callable (TF1 hub format?); pass one of its "
                f"signatures with signature=... Available signatures: {available}"
            )
        self._fn = self._module.__call__
        self._accepts_training = self._takes_training(self._fn)
        if not hasattr(self._module, "variables"):  # a plain SavedModel: its functions' variables
            return _function_variables(self._fn)
        trainable = list(getattr(self._module, "trainable_variables", []))
        return list(self._module.variables), trainable

    def _wrap_variables(self, module_variables, trainable_ids) -> None:
        """Tracks each module variable once, as a Keras variable sharing its storage."""
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
        self._compiled_patterns = _compile_patterns(self.trainable_patterns)
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

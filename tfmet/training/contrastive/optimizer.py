"""Adam with PyTorch's coupled weight decay and epsilon placement; the reference's step decay."""

import keras


@keras.saving.register_keras_serializable(package="tfmet")
class TorchAdam(keras.optimizers.Adam):
    """Adam with PyTorch's update: w -= lr * m_hat / (sqrt(v_hat) + epsilon).

    Keras's Adam adds epsilon to sqrt(v) before the bias correction, i.e. uses
    epsilon / sqrt(1 - beta_2^t) in PyTorch's terms, which matters for the tiny gradients of a
    1e-7 learning-rate fine-tuning. Weight decay is not part of the optimizer: the trainer adds
    `weight_decay * w` to the gradient, as `torch.optim.Adam(weight_decay=...)` does.
    """

    def __init__(self, learning_rate=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-8, **kwargs):
        if kwargs.get("amsgrad"):
            raise ValueError("TorchAdam does not implement amsgrad. Received: amsgrad=True")
        super().__init__(
            learning_rate=learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon, **kwargs
        )

    def update_step(self, gradient, variable, learning_rate):
        ops = keras.ops
        lr = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        step = ops.cast(self.iterations + 1, variable.dtype)
        beta_1 = ops.cast(self.beta_1, variable.dtype)
        beta_2 = ops.cast(self.beta_2, variable.dtype)
        m = self._momentums[self._get_variable_index(variable)]
        v = self._velocities[self._get_variable_index(variable)]
        self.assign_add(m, ops.multiply(ops.subtract(gradient, m), 1 - beta_1))
        self.assign_add(v, ops.multiply(ops.subtract(ops.square(gradient), v), 1 - beta_2))
        m_hat = ops.divide(m, 1 - ops.power(beta_1, step))
        v_hat = ops.divide(v, 1 - ops.power(beta_2, step))
        self.assign_sub(
            variable, ops.divide(ops.multiply(lr, m_hat), ops.add(ops.sqrt(v_hat), self.epsilon))
        )


def step_decay(base_lr, epoch, step_size, gamma):
    """PyTorch StepLR stepped once per epoch: base_lr * gamma^floor((epoch - 1) / step_size).

    `epoch` counts from 1; epochs 1..step_size use `base_lr`.
    """
    if int(epoch) < 1 or int(step_size) < 1:
        raise ValueError(f"`epoch` and `step_size` must be >= 1. Received: {epoch}, {step_size}")
    return float(base_lr) * float(gamma) ** ((int(epoch) - 1) // int(step_size))

"""Small Keras models for simulations: fast on two CPU cores, identical weights for identical seeds.

All nodes of a simulation build their model from the same seed, so federation
starts from one common initialization (as a server-side FedAvg would).
"""

from __future__ import annotations

from typing import Any


def build_keras_model(
    dataset_name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    seed: int = 0,
    learning_rate: float = 1e-3,
) -> Any:
    """Compiled ``keras.Model``: an MLP for ``digits``, a small CNN for the 28x28 image datasets."""
    import keras

    seeds = iter(range(seed * 1000, seed * 1000 + 1000))

    def dense(units: int, activation: str | None) -> Any:
        return keras.layers.Dense(
            units, activation=activation, kernel_initializer=keras.initializers.GlorotUniform(seed=next(seeds))
        )

    def conv(filters: int) -> Any:
        return keras.layers.Conv2D(
            filters,
            3,
            activation="relu",
            padding="same",
            kernel_initializer=keras.initializers.GlorotUniform(seed=next(seeds)),
        )

    name = dataset_name.lower().replace("-", "_")
    layers: list[Any] = [keras.Input(shape=tuple(input_shape))]
    if name == "digits" or len(input_shape) == 1:
        if len(input_shape) > 1:
            layers.append(keras.layers.Flatten())
        layers += [dense(64, "relu"), dense(64, "relu")]
    else:
        if len(input_shape) == 2:  # (28, 28) -> (28, 28, 1)
            layers.append(keras.layers.Reshape((*input_shape, 1)))
        layers += [
            conv(16),
            keras.layers.MaxPooling2D(2),
            conv(32),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),
            dense(64, "relu"),
        ]
    layers.append(dense(num_classes, "softmax"))
    model = keras.Sequential(layers, name=f"{name}_model")
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model

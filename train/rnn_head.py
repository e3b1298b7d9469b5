"""The CNN -> RNN tag decoder head: the registered `TagDecoder` layer, label sequences, training model and tagger.

Token ids: 0 pad, 1 start, 2 end, 3 + c for class c (class-index order; the label order only decides in which order
a training sequence lists an image's classes). The decoder layer is called twice on the same pooled features:

    decoder(features, tokens) -> (B, K+1, K+3) float32 logits        teacher forcing (the training model)
    decoder(features)         -> (B, K) float32 per-class scores     greedy / beam decoding in the graph (the tagger)

The tagger is what model.keras holds, so every RUN_DIR consumer gets one score per class. The score of class c,
with p_max[c] its highest softmax probability over the decoded steps (up to and including the step emitting end):

    emitted:      0.5 + 0.5 * p_max[c]                 in [0.5, 1]
    not emitted:  min(0.5 * p_max[c], 0.49999997)      in [0, 0.5)

so the 0.5 threshold gives exactly the decoded set, and within a class the score ranks images (emitted first, then
by p_max). Importing this module registers `TagDecoder`; `keras.saving.load_model` of an rnn run needs it imported.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf
from keras import ops

PAD, START, END, FIRST_CLASS = 0, 1, 2, 3
NEG = -1e30  # "impossible" log-score; finite so that sums never make inf - inf = nan
# The largest float32 strictly below 0.5: a non-emitted class never reaches the 0.5 threshold, even at p == 1.
BELOW_HALF = float(np.nextafter(np.float32(0.5), np.float32(0.0)))
CELLS = ("lstm", "gru")
LABEL_ORDERS = ("frequent", "rare", "index")
CLIPNORM = 1.0  # Adam's per-gradient norm clip for the rnn head, both stages (recurrent gradients can explode)
DECODER_LAYER = "decoder"


@dataclass(frozen=True, kw_only=True)
class DecoderSpec:
    """The decoder's settings: cell (lstm|gru), state size, label embedding size, and whether the empty set may be
    decoded (False when every training image has a label: end is then banned at the first step)."""

    cell: str = "lstm"
    units: int = 512
    embedding_dim: int = 64
    allow_empty: bool = False


@keras.saving.register_keras_serializable(package="fashion_tagger")
class TagDecoder(keras.layers.Layer):
    """Initial state from pooled features (Dense h0, and c0 for the LSTM), label Embedding, LSTM/GRU, float32 Dense
    over the K+3 tokens. Without tokens: decodes in the graph and returns one score in [0, 1] per class."""

    def __init__(self, n_classes: int, cell: str = "lstm", units: int = 512, embedding_dim: int = 64,
                 allow_empty: bool = True, beam_width: int = 1, l2: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {', '.join(CELLS)}, got {cell!r}")
        self.n_classes, self.cell_type, self.units = int(n_classes), cell, int(units)
        self.embedding_dim, self.allow_empty, self.beam_width, self.l2 = (
            int(embedding_dim), bool(allow_empty), int(beam_width), float(l2))

        def reg():
            return keras.regularizers.L2(l2) if l2 > 0 else None

        policy = self.dtype_policy  # sublayers follow the decoder's policy (mixed_float16 when built under it)
        self.init_h = keras.layers.Dense(units, activation="tanh", kernel_regularizer=reg(), dtype=policy,
                                         name="init_h")
        self.init_c = (keras.layers.Dense(units, kernel_regularizer=reg(), dtype=policy, name="init_c")
                       if cell == "lstm" else None)
        self.embedding = keras.layers.Embedding(self.n_tokens, embedding_dim, dtype=policy, name="token_embedding")
        rnn_class = keras.layers.LSTM if cell == "lstm" else keras.layers.GRU
        self.rnn = rnn_class(units, return_sequences=True, dtype=policy, name=cell)  # .cell is the step function
        self.token_logits = keras.layers.Dense(self.n_tokens, kernel_regularizer=reg(), dtype="float32",
                                               name="token_logits")

    @property
    def n_tokens(self) -> int:
        return self.n_classes + FIRST_CLASS

    @property
    def max_steps(self) -> int:
        return self.n_classes + 1

    def build(self, features_shape, tokens_shape=None):
        # Every sublayer explicitly: the tagger's graph never calls the RNN on a sequence.
        self.init_h.build(features_shape)
        if self.init_c is not None:
            self.init_c.build(features_shape)
        self.embedding.build((None, None))
        self.rnn.build((None, None, self.embedding_dim))
        self.token_logits.build((None, self.units))

    def get_config(self):
        return {**super().get_config(), "n_classes": self.n_classes, "cell": self.cell_type, "units": self.units,
                "embedding_dim": self.embedding_dim, "allow_empty": self.allow_empty,
                "beam_width": self.beam_width, "l2": self.l2}

    def compute_output_spec(self, features, tokens=None):
        # Declared, so that the symbolic build never traces the decoding loop.
        if tokens is not None:
            return keras.KerasTensor((features.shape[0], tokens.shape[1], self.n_tokens), dtype="float32")
        return keras.KerasTensor((features.shape[0], self.n_classes), dtype="float32")

    # --- pieces ------------------------------------------------------------------------------------------------
    def initial_states(self, features):
        h0 = self.init_h(features)
        return [h0, self.init_c(features)] if self.init_c is not None else [h0]

    def step(self, token, states):
        """One decoder step: previous token (B,) int32 and states -> float32 logits (B, K+3), new states."""
        output, new_states = self.rnn.cell(self.embedding(token), states)
        new_states = list(new_states) if isinstance(new_states, (list, tuple)) else [new_states]
        return self.token_logits(output), new_states

    def banned(self, step, emitted):
        """(B, K+3) bool: pad and start always; end at the first step if empty sets are not allowed; emitted."""
        b = ops.shape(emitted)[0]
        end_banned = ops.logical_and(ops.equal(step, 0), not self.allow_empty)
        head = ops.concatenate([ops.ones((b, 2), "bool"), ops.broadcast_to(ops.reshape(end_banned, (1, 1)), (b, 1))],
                               axis=1)
        return ops.concatenate([head, emitted], axis=1)

    @staticmethod
    def scores(emitted, p_max):
        """Per-class score: emitted -> 0.5 + 0.5 p_max (>= 0.5); not emitted -> 0.5 p_max capped below 0.5."""
        p_max = ops.clip(ops.cast(p_max, "float32"), 0.0, 1.0)
        return ops.where(emitted, 0.5 + 0.5 * p_max, ops.minimum(0.5 * p_max, BELOW_HALF))

    # --- call --------------------------------------------------------------------------------------------------
    def call(self, features, tokens=None, training=None):
        states = self.initial_states(features)
        if tokens is not None:  # teacher forcing
            return self.token_logits(self.rnn(self.embedding(tokens), initial_state=states, training=training))
        decode = self.beam_decode if self.beam_width > 1 else self.greedy_decode
        return self.scores(*decode(states))

    def greedy_decode(self, states):
        """-> emitted (B, K) bool, p_max (B, K) float32. At most K+1 steps; an emitted class is banned after."""
        b, k = ops.shape(states[0])[0], self.n_classes
        init = (ops.convert_to_tensor(0, "int32"), ops.full((b,), START, "int32"), states,
                ops.zeros((b, k), "bool"), ops.zeros((b, k), "float32"), ops.zeros((b,), "bool"))

        def cond(step, token, states, emitted, p_max, finished):
            return ops.logical_and(step < self.max_steps, ops.logical_not(ops.all(finished)))

        def body(step, token, states, emitted, p_max, finished):
            logits, states = self.step(token, states)
            probs = ops.softmax(logits, axis=-1)  # from the float32 logits, also under mixed precision
            nxt = first_max(ops.where(self.banned(step, emitted), NEG, logits))
            active = ops.logical_not(finished)
            p_max = ops.where(active[:, None], ops.maximum(p_max, probs[:, FIRST_CLASS:]), p_max)
            new = ops.logical_and(class_one_hot(nxt, k), active[:, None])
            return (step + 1, ops.where(active, nxt, PAD), states, ops.logical_or(emitted, new), p_max,
                    ops.logical_or(finished, ops.equal(nxt, END)))

        _, _, _, emitted, p_max, _ = ops.while_loop(cond, body, init, maximum_iterations=self.max_steps)
        return emitted, p_max

    def beam_decode(self, states):
        """Beam search of width n = beam_width on summed masked log-probabilities (no length normalisation); the best
        hypothesis as (emitted, p_max) like greedy_decode. Each beam proposes its top tokens by logit (so n = 1 picks
        greedy's argmax with the same tie-break), then the best n of the candidates survive."""
        n = self.beam_width
        b, k, m = ops.shape(states[0])[0], self.n_classes, min(n, self.n_tokens)  # m proposals per beam

        def rep(x):
            return ops.reshape(ops.repeat(x[:, None], n, axis=1), (b * n, *tuple(x.shape[1:])))

        score0 = ops.concatenate([ops.zeros((b, 1)), ops.full((b, n - 1), NEG)], axis=1)  # one live beam at first
        init = (ops.convert_to_tensor(0, "int32"), ops.full((b * n,), START, "int32"), [rep(s) for s in states],
                ops.zeros((b * n, k), "bool"), ops.zeros((b * n, k), "float32"), ops.zeros((b * n,), "bool"),
                score0)

        def cond(step, token, states, emitted, p_max, finished, score):
            return ops.logical_and(step < self.max_steps, ops.logical_not(ops.all(finished)))

        def body(step, token, states, emitted, p_max, finished, score):
            logits, new_states = self.step(token, states)                          # (B*n, V)
            probs = ops.softmax(logits, axis=-1)
            masked = ops.where(self.banned(step, emitted), NEG, logits)
            top_logit, top_tok = ops.top_k(masked, m)                             # ties -> lower id
            logp = ops.take_along_axis(ops.log_softmax(masked, axis=-1), top_tok, axis=-1)
            logp = ops.where(top_logit <= NEG / 2, NEG, logp)                      # banned stays impossible
            # A finished hypothesis has exactly one continuation: itself (pad, +0).
            rank0 = ops.arange(m)[None, :] == 0
            fin = finished[:, None]
            logp = ops.where(fin, ops.where(rank0, 0.0, NEG), logp)
            top_tok = ops.where(fin, PAD, top_tok)
            cand = ops.reshape(score, (b * n, 1)) + logp                           # (B*n, m)
            best, flat = ops.top_k(ops.reshape(cand, (b, n * m)), n)               # beam-major: ties -> lower beam
            parent = flat // m
            rows = ops.reshape(parent + ops.arange(b)[:, None] * n, (b * n,))
            tok = ops.reshape(ops.take_along_axis(ops.reshape(top_tok, (b, n * m)), flat, axis=1), (b * n,))
            was_finished = ops.take(finished, rows, axis=0)
            active = ops.logical_not(was_finished)
            p_max = ops.take(p_max, rows, axis=0)
            p_new = ops.take(probs[:, FIRST_CLASS:], rows, axis=0)
            p_max = ops.where(active[:, None], ops.maximum(p_max, p_new), p_max)
            new = ops.logical_and(class_one_hot(tok, k), active[:, None])
            emitted = ops.logical_or(ops.take(emitted, rows, axis=0), new)
            states = [ops.take(s, rows, axis=0) for s in new_states]
            finished = ops.logical_or(was_finished, ops.equal(tok, END))
            return step + 1, tok, states, emitted, p_max, finished, best

        _, _, _, emitted, p_max, _, _ = ops.while_loop(cond, body, init, maximum_iterations=self.max_steps)
        # top_k keeps beams sorted, so beam 0 is the best hypothesis.
        return ops.reshape(emitted, (b, n, k))[:, 0], ops.reshape(p_max, (b, n, k))[:, 0]


def first_max(x):
    """Index of the largest value along the last axis, (B, V) -> (B,) int32; ties go to the lower index.

    `ops.top_k` rather than `ops.argmax`: Keras's float argmax adds a signbit test (Bitcast, BitwiseAnd) that
    neither tf2onnx nor OpenVINO can convert, so with it the decoder would not export. The two agree except on a tie
    between +0.0 and -0.0, which argmax breaks towards +0.0.
    """
    return ops.cast(ops.top_k(x, 1)[1][:, 0], "int32")


def class_one_hot(tokens, n_classes: int):
    """Token ids (B,) -> (B, K) bool with the emitted class set; pad, start and end set none.

    One-hot over all K+3 tokens, then the special tokens' columns dropped: a one-hot of the negative index
    `token - 3` would do the same in TensorFlow (an all-zero row) but counts from the end in ONNX's OneHot.
    """
    return ops.one_hot(tokens, n_classes + FIRST_CLASS, dtype="bool")[:, FIRST_CLASS:]


# --- models ------------------------------------------------------------------------------------------------------


def decoder_layer(n_classes: int, spec: DecoderSpec, l2: float = 0.0) -> TagDecoder:
    """The head's decoder layer for `n_classes` classes (train.model.build_model puts it on the pooled features)."""
    return TagDecoder(n_classes, cell=spec.cell, units=spec.units, embedding_dim=spec.embedding_dim,
                      allow_empty=spec.allow_empty, l2=l2, name=DECODER_LAYER)


def training_model(tagger: keras.Model) -> keras.Model:
    """The teacher-forcing model {"image", "tokens"} -> (B, K+1, K+3) logits over the tagger's own layers (shared
    weights: fitting it trains the tagger)."""
    decoder = tagger.get_layer(DECODER_LAYER)
    features = decoder.input if not isinstance(decoder.input, list) else decoder.input[0]
    tokens = keras.Input((decoder.max_steps,), dtype="int32", name="tokens")
    return keras.Model({"image": tagger.inputs[0], "tokens": tokens}, decoder(features, tokens),
                       name=f"{tagger.name}_teacher_forcing")


def with_beam(tagger: keras.Model, beam_width: int) -> keras.Model:
    """The same tagger (same weights) decoding with a beam of `beam_width`; 1 is greedy."""
    config = tagger.get_config()
    for layer in config["layers"]:
        if layer["class_name"].endswith("TagDecoder"):
            layer["config"]["beam_width"] = int(beam_width)
    clone = keras.Model.from_config(config)
    clone.set_weights(tagger.get_weights())
    return clone


def sequence_loss() -> keras.losses.Loss:
    """Cross-entropy of the target tokens, a mean over the real ones (pad targets are masked out)."""
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=PAD)


# --- label sequences ---------------------------------------------------------------------------------------------


def class_order(train_labels: np.ndarray, order: str) -> np.ndarray:
    """Class indices in emission order: frequent (training prevalence descending, ties by index), rare, index."""
    k = train_labels.shape[1]
    prevalence = np.asarray(train_labels).sum(axis=0)
    idx = np.arange(k)
    if order == "index":
        return idx
    if order == "frequent":
        return np.lexsort((idx, -prevalence))  # the last key is the primary one
    if order == "rare":
        return np.lexsort((idx, prevalence))
    raise ValueError(f"label order must be one of {', '.join(LABEL_ORDERS)}, got {order!r}")


def label_sequences(labels: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """0/1 labels (N, K) -> (decoder inputs, targets), each (N, K+1) int32:
    inputs = start, c1 .. cn, pad ...; targets = c1 .. cn, end, pad ... (classes as token ids 3 + c)."""
    n, k = labels.shape
    inputs = np.full((n, k + 1), PAD, np.int32)
    targets = np.full((n, k + 1), PAD, np.int32)
    for i, row in enumerate(np.asarray(labels)):
        tokens = [FIRST_CLASS + int(c) for c in order if row[c] > 0.5]
        inputs[i, : len(tokens) + 1] = [START, *tokens]
        targets[i, : len(tokens) + 1] = [*tokens, END]
    return inputs, targets


def sequence_rows(labels: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Inputs and targets side by side, (N, 2K+2): the label rows make_dataset carries (float32 is exact here)."""
    return np.concatenate(label_sequences(labels, order), axis=1)


def teacher_forcing(ds: tf.data.Dataset, n_classes: int) -> tf.data.Dataset:
    """(images, sequence_rows) batches -> ({"image", "tokens"}, targets) batches of the training model."""
    steps = n_classes + 1

    def split(images, rows):
        rows = tf.cast(rows, tf.int32)
        return {"image": images, "tokens": rows[:, :steps]}, rows[:, steps:]

    return ds.map(split)

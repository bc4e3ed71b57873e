"""NumPy references for ONNX LSTM, GRU and RNN, one direction, computed in float64."""

from __future__ import annotations

import numpy as np


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _prepare(x, w, r, b, h0, gates):
    x, w, r = (np.asarray(a, np.float64) for a in (x, w, r))
    n_b, n_h = x.shape[1], r.shape[-1]
    b = np.zeros(2 * gates * n_h) if b is None else np.asarray(b, np.float64)
    h = np.zeros((n_b, n_h)) if h0 is None else np.asarray(h0, np.float64)
    return x, w, r, b[: gates * n_h], b[gates * n_h :], h


def _run(x, reverse, step):
    """Y in input time order, stepping backwards for the reverse direction."""
    order = range(len(x) - 1, -1, -1) if reverse else range(len(x))
    outs = {t: step(x[t]) for t in order}
    return np.stack([outs[t] for t in range(len(x))])


def lstm_reference(x, w, r, b=None, p=None, h0=None, c0=None, reverse=False):
    """x [T, B, I], w [4H, I], r [4H, H], b [8H], p [3H] (i, o, f), h0/c0 [B, H] -> y, h, c."""
    x, w, r, wb, rb, h = _prepare(x, w, r, b, h0, 4)
    n_h = r.shape[-1]
    c = np.zeros_like(h) if c0 is None else np.asarray(c0, np.float64)
    p = np.zeros(3 * n_h) if p is None else np.asarray(p, np.float64)
    p_i, p_o, p_f = p[:n_h], p[n_h : 2 * n_h], p[2 * n_h :]
    state = {"h": h, "c": c}

    def step(xt):
        g = xt @ w.T + state["h"] @ r.T + wb + rb
        g_i, g_o, g_f, g_c = np.split(g, 4, axis=-1)
        c_prev = state["c"]
        c_new = _sigmoid(g_f + p_f * c_prev) * c_prev + _sigmoid(g_i + p_i * c_prev) * np.tanh(g_c)
        state["h"] = _sigmoid(g_o + p_o * c_new) * np.tanh(c_new)
        state["c"] = c_new
        return state["h"]

    y = _run(x, reverse, step)
    return y, state["h"], state["c"]


def gru_reference(x, w, r, b=None, h0=None, linear_before_reset=False, reverse=False):
    """x [T, B, I], w [3H, I] (z, r, h), r [3H, H], b [6H], h0 [B, H] -> y, h."""
    x, w, r, wb, rb, h = _prepare(x, w, r, b, h0, 3)
    n_h = r.shape[-1]
    state = {"h": h}

    def step(xt):
        h_prev = state["h"]
        gx = xt @ w.T + wb
        z = _sigmoid(gx[:, :n_h] + h_prev @ r[:n_h].T + rb[:n_h])
        rr = _sigmoid(gx[:, n_h : 2 * n_h] + h_prev @ r[n_h : 2 * n_h].T + rb[n_h : 2 * n_h])
        if linear_before_reset:
            hh = gx[:, 2 * n_h :] + rr * (h_prev @ r[2 * n_h :].T + rb[2 * n_h :])
        else:
            hh = gx[:, 2 * n_h :] + (rr * h_prev) @ r[2 * n_h :].T + rb[2 * n_h :]
        state["h"] = (1 - z) * np.tanh(hh) + z * h_prev
        return state["h"]

    y = _run(x, reverse, step)
    return y, state["h"]


def rnn_reference(x, w, r, b=None, h0=None, reverse=False):
    """x [T, B, I], w [H, I], r [H, H], b [2H], h0 [B, H] -> y, h (tanh activation)."""
    x, w, r, wb, rb, h = _prepare(x, w, r, b, h0, 1)
    state = {"h": h}

    def step(xt):
        state["h"] = np.tanh(xt @ w.T + state["h"] @ r.T + wb + rb)
        return state["h"]

    y = _run(x, reverse, step)
    return y, state["h"]

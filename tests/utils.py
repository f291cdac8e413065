"""Small helpers shared by tests."""
import socket

import torch


def randomize_(model: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Give every parameter random values: adaLN-Zero initialises the output to zero, which would make u and u_dot
    trivially 0 and every comparison vacuous."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(|b|, tiny): a scale-free error for comparing implementations."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def free_port() -> int:
    """A free TCP port on localhost for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

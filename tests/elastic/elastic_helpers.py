"""What the elastic tests share: a model run with the inputs of some linears cut."""
import torch


def run_with_inputs_cut(model, x, cuts):
    """``model(x)`` with the input features ``d:`` of each ``(linear, d)`` in ``cuts`` zeroed:
    dropped heads before ``proj``, dropped hidden units before ``fc2``."""
    def hook(d):
        def cut(m, args):
            (a,) = args
            a = a.clone()
            a[..., d:] = 0
            return (a,)
        return cut

    hooks = [lin.register_forward_pre_hook(hook(d)) for lin, d in cuts]
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for h in hooks:
            h.remove()

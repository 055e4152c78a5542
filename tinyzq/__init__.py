"""tinyzq: run and train 2/3/4-bit LLMs on plain CPUs (NumPy + small C kernels, no torch).

    import tinyzq
    m = tinyzq.load("model.gguf")                 # or a Hugging Face dir, or a .tzq dir
    q = tinyzq.quantize("model.gguf", "w3.tzq", bits=3, group=64)
    print(q.generate("What is the capital of France?", chat=True))
    tinyzq.train("w3.tzq", "run", minutes=10)      # zeroth-order QAT; trained model in run/model
"""
from .errors import TinyzqError

__version__ = "0.1.0"
__all__ = ["load", "convert", "quantize", "train", "Model", "TinyzqError", "__version__"]


def __getattr__(name):  # import the API lazily so `import tinyzq` stays cheap
    if name == "train":  # the module tinyzq/train.py, callable as tinyzq.train(...) (= api.train)
        import importlib
        return importlib.import_module(".train", __name__)
    if name in ("load", "convert", "quantize", "Model"):
        from . import api
        return getattr(api, name)
    raise AttributeError(name)

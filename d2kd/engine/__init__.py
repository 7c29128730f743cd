from .trainer import DistillTrainer

__all__ = ["DistillTrainer"]

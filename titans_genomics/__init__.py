"""Titans neural memory for DNA: tokenizer, FASTA/GUE data, and a scikit-learn style classifier.

- :class:`NucleotideTokenizer`, :func:`reverse_complement` (:mod:`titans_genomics.tokenizer`);
- :func:`read_fasta`, :class:`FastaGenome` (:mod:`titans_genomics.fasta`);
- :func:`load_gue`, :func:`load_fasta_classes`, :func:`load_oct4_mafk` (:mod:`titans_genomics.datasets`);
- :class:`TitansSequenceNetwork` (:mod:`titans_genomics.module`): embedding -> Titans backbone ->
  masked pooling -> head;
- :class:`TitansSequenceClassifier` (:mod:`titans_genomics.classifier`): fit / predict /
  predict_proba / save / load, reverse-complement augmentation and averaging, chunked
  long-sequence inference;
- :func:`tune` (:mod:`titans_genomics.tuning`): Optuna studies of the classifier;
- the ``titans-genomics`` command line (:mod:`titans_genomics.cli`).
"""

from .classifier import TitansSequenceClassifier
from .datasets import gue_tasks, load_fasta_classes, load_gue, load_oct4_mafk
from .fasta import FastaGenome, read_fasta
from .module import TitansSequenceNetwork
from .tokenizer import NucleotideTokenizer, reverse_complement
from .tuning import tune

__all__ = [
    "FastaGenome", "NucleotideTokenizer", "TitansSequenceClassifier", "TitansSequenceNetwork",
    "gue_tasks", "load_fasta_classes", "load_gue", "load_oct4_mafk", "read_fasta", "reverse_complement", "tune",
]

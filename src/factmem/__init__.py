"""factmem: continual memorization of factoids in language models.

Pipeline (data flows one way):
    config -> sources -> stage mixtures -> train stage k -> evaluate tracked sets -> ... -> results
"""

__version__ = "0.1.0"

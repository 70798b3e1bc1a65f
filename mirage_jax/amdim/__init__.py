"""AMDIM (Bachman, Hjelm & Buchwalter 2019): encoders trained by maximising mutual
information across views, our judges where no pretrained SyncNet or Inception exists.
model.py: encoder and feature heads; augment.py: the views; loss.py: multi-scale InfoNCE;
probe.py: linear probes on frozen features."""

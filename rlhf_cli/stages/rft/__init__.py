"""Rejection-sampling fine-tuning (RFT, Llama 2's rejection sampling) and RAFT, in rounds."""

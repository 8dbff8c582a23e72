"""Floors 2-4, the networks: losses, Keras layers, the two subnetworks, the VTN cascade with its
training step, and checkpoints.
"""

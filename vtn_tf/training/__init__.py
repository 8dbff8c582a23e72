"""Training: configuration files (`config`), prepared datasets into `tf.data` (`data`) and the training
run (`loop`).
"""

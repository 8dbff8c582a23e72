"""Serving: the SavedModel export (`export`) and the warm local registration server (`warm`).
"""

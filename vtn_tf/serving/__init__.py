"""Serving: the SavedModel export (`export`).
"""

"""Prefect flows around the catalog_tagger library: ``nightly`` (nightly_tagging, backfill), ``train`` (train_model).

Parameters are pydantic models in ``params``; deployments live in ``deploy/prefect.yaml``.
"""

"""Offline tools: conversion to shards, verification, synthetic data and benchmarks."""

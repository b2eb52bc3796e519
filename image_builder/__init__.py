"""Filesystem images, whole-disk images and the signed release bundle format (reader and writer)."""

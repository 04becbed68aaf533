"""accelerators"""

"""conf"""

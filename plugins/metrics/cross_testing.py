"""(in progress: registers nothing yet)"""

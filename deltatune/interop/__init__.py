"""Reading and writing other libraries' formats. Every PEFT name mapping lives in peft.py."""

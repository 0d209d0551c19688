module deepe-example

go 1.21

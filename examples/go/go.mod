module deepe-example

go 1.19

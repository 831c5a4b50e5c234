# The permissions are the aws-vpc provider's own policy documents, read from the repository so
# that the cluster always tests exactly what the provider ships. Never paste a copy here.

locals {
  ec2_assume_role = jsonencode({
    Version = "2012-10-17"
    Statement = [{
      Effect    = "Allow"
      Action    = "sts:AssumeRole"
      Principal = { Service = "ec2.amazonaws.com" }
    }]
  })
}

resource "aws_iam_role" "node" {
  name               = "${var.cluster_name}-node"
  description        = "cloudroutes agent on a ${var.cluster_name} node (aws-vpc)"
  assume_role_policy = local.ec2_assume_role
}

resource "aws_iam_role_policy" "node" {
  name   = "cloudroutes-aws-vpc-node"
  role   = aws_iam_role.node.id
  policy = file("${path.module}/../../providers/policies/aws-vpc-node.json")
}

resource "aws_iam_instance_profile" "node" {
  name = "${var.cluster_name}-node"
  role = aws_iam_role.node.name
}

resource "aws_iam_role" "controller" {
  count = var.controller_role ? 1 : 0

  name               = "${var.cluster_name}-controller"
  description        = "cloudroutes cluster-mode controller for ${var.cluster_name} (aws-vpc)"
  assume_role_policy = local.ec2_assume_role
}

resource "aws_iam_role_policy" "controller" {
  count = var.controller_role ? 1 : 0

  name   = "cloudroutes-aws-vpc-controller"
  role   = aws_iam_role.controller[0].id
  policy = file("${path.module}/../../providers/policies/aws-vpc-controller.json")
}

resource "aws_iam_instance_profile" "controller" {
  count = var.controller_role ? 1 : 0

  name = "${var.cluster_name}-controller"
  role = aws_iam_role.controller[0].name
}

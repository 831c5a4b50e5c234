# The permissions are the gce provider's own custom-role definitions, read from the repository
# so that the cluster always tests exactly what the provider ships. Never paste a copy here.
# Custom role ids allow only letters, digits, '_' and '.'.

locals {
  role_prefix = "cloudroutes_${replace(var.cluster_name, "-", "_")}"
}

resource "google_service_account" "node" {
  account_id   = "${var.cluster_name}-node"
  display_name = "cloudroutes node, ${var.cluster_name}"
  description  = "cloudroutes agent on a ${var.cluster_name} node (gce)"
}

resource "google_project_iam_custom_role" "node" {
  role_id     = "${local.role_prefix}_node"
  title       = "cloudroutes gce node (${var.cluster_name})"
  description = "providers/policies/gce-node.json of cloudroutes"
  permissions = jsondecode(file("${path.module}/../../providers/policies/gce-node.json")).includedPermissions
}

resource "google_project_iam_member" "node" {
  project = var.project
  role    = google_project_iam_custom_role.node.name
  member  = "serviceAccount:${google_service_account.node.email}"
}

resource "google_service_account" "controller" {
  count = var.controller_role ? 1 : 0

  account_id   = "${var.cluster_name}-ctrl"
  display_name = "cloudroutes controller, ${var.cluster_name}"
  description  = "cloudroutes cluster-mode controller for ${var.cluster_name} (gce)"
}

resource "google_project_iam_custom_role" "controller" {
  count = var.controller_role ? 1 : 0

  role_id     = "${local.role_prefix}_controller"
  title       = "cloudroutes gce controller (${var.cluster_name})"
  description = "providers/policies/gce-controller.json of cloudroutes"
  permissions = jsondecode(file("${path.module}/../../providers/policies/gce-controller.json")).includedPermissions
}

resource "google_project_iam_member" "controller" {
  count = var.controller_role ? 1 : 0

  project = var.project
  role    = google_project_iam_custom_role.controller[0].name
  member  = "serviceAccount:${google_service_account.controller[0].email}"
}
